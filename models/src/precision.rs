//! The arithmetic an encoder's linear layers run in: fp32, or int8 weights and activations
//! (see [`crate::kernels::int8`]).

use serde::{Deserialize, Serialize};

/// Numeric precision of the encoder's linear layers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// fp32 everywhere: the reference.
    #[default]
    Fp32,
    /// int8 linear layers (weights per output channel, activations per token); attention,
    /// softmax, layer norm and pooling stay fp32.
    Int8,
}

/// An unknown precision name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown precision '{name}': use one of {allowed}", allowed = Precision::ALLOWED)]
pub struct UnknownPrecision {
    /// The name given, cut to 32 characters.
    pub name: String,
}

impl Precision {
    /// The accepted names, for messages.
    pub const ALLOWED: &'static str = "fp32, int8";

    pub fn name(self) -> &'static str {
        match self {
            Self::Fp32 => "fp32",
            Self::Int8 => "int8",
        }
    }

    /// From a name, case-insensitive. An empty name is fp32 (versions registered before
    /// precisions existed carry none).
    pub fn from_name(name: &str) -> Result<Self, UnknownPrecision> {
        match name.trim().to_ascii_lowercase().as_str() {
            "" | "fp32" | "f32" | "float32" => Ok(Self::Fp32),
            "int8" | "i8" => Ok(Self::Int8),
            _ => Err(UnknownPrecision {
                name: name.chars().take(32).collect(),
            }),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = UnknownPrecision;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::from_name(name)
    }
}

#[cfg(test)]
mod tests {
    use super::Precision;

    #[test]
    fn names_round_trip_and_unknown_names_list_the_allowed_ones() {
        for precision in [Precision::Fp32, Precision::Int8] {
            assert_eq!(Precision::from_name(precision.name()), Ok(precision));
        }
        assert_eq!(Precision::from_name(""), Ok(Precision::Fp32));
        assert_eq!(Precision::from_name("INT8"), Ok(Precision::Int8));
        let error = Precision::from_name("int4").unwrap_err().to_string();
        assert!(
            error.contains("int4") && error.contains("fp32, int8"),
            "{error}"
        );
    }
}
