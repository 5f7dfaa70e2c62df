//! troupe-proto: the wire protocol.
//!
//! - [`v1`]: the prost messages and tonic services generated from `troupe/v1/*.proto`.
//! - [`convert`]: `TryFrom` conversions from wire messages to validated domain values.
//!   A malformed message is an [`convert::ProtoError`], never a panic.
//! - [`names`]: the one rule for names, shared with the state machine.

pub mod convert;
pub mod names;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("troupe.v1");
}

/// The encoded `FileDescriptorSet` of every troupe proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("troupe_descriptor");
