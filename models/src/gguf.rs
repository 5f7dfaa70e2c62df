//! GGUF files (version 2 and 3): the metadata, the tensor table, and each tensor's bytes as a
//! slice of the memory-mapped file.
//!
//! A GGUF file is read as untrusted input: every count and length is checked against the
//! bytes that are left before anything is allocated for it, every tensor's data must lie
//! inside the file, and a tensor's size must be a whole number of its type's blocks. A file
//! that breaks any of these is refused with [`GgufError`] naming the offset and the field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::quant::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// More dimensions than ggml has (4) is a corrupt file.
const MAX_DIMS: u32 = 4;

/// Why a GGUF file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a GGUF file (it does not start with 'GGUF'): pass the model's .gguf file"
    )]
    NotGguf { path: PathBuf },
    #[error("{path} is GGUF version {version}; troupe reads versions 2 and 3")]
    Version { path: PathBuf, version: u32 },
    #[error("{path} is corrupt at byte {offset}: {reason} (fetch the model again)")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error("{path}: metadata key {key} is {problem}")]
    Metadata {
        path: PathBuf,
        key: String,
        problem: String,
    },
    #[error("{path}: tensor {name} is {problem}")]
    Tensor {
        path: PathBuf,
        name: String,
        problem: String,
    },
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// An integer of any width, if it is one and not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }
}

/// One tensor's entry in the table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// From the start of the data section.
    pub offset: u64,
    /// Bytes of data.
    pub size: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape outermost first, as numpy and burn write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    data_start: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// A bounds-checked reader over the file's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn corrupt(&self, reason: impl Into<String>) -> GgufError {
        GgufError::Corrupt {
            path: self.path.to_owned(),
            offset: self.at as u64,
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let left = self.bytes.len() - self.at;
        if n > left {
            return Err(self.corrupt(format!(
                "{what} needs {n} bytes but the file ends {left} bytes later"
            )));
        }
        let slice = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each at least `min_item` bytes long, checked against what is left.
    fn count(&mut self, min_item: usize, what: &str) -> Result<usize, GgufError> {
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.at) as u64;
        if n.saturating_mul(min_item as u64) > left {
            return Err(self.corrupt(format!(
                "{what} is {n}, more than the {left} bytes left can hold"
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.count(1, what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.corrupt(format!("{what} is not valid UTF-8")))
    }

    fn value(&mut self, kind: u32, depth: u8) -> Result<Value, GgufError> {
        Ok(match kind {
            0 => Value::U8(self.array::<1>("a u8")?[0]),
            1 => Value::I8(self.array::<1>("an i8")?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array("a u16")?)),
            3 => Value::I16(i16::from_le_bytes(self.array("an i16")?)),
            4 => Value::U32(self.u32("a u32")?),
            5 => Value::I32(i32::from_le_bytes(self.array("an i32")?)),
            6 => Value::F32(f32::from_le_bytes(self.array("an f32")?)),
            7 => match self.array::<1>("a bool")?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                other => return Err(self.corrupt(format!("a bool is {other}, not 0 or 1"))),
            },
            8 => Value::String(self.string("a string's length")?),
            9 => {
                if depth > 0 {
                    return Err(self.corrupt("an array nests inside an array"));
                }
                let item = self.u32("an array's item type")?;
                let min = match item {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    _ => 12,
                };
                let n = self.count(min, "an array's length")?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64("a u64")?),
            11 => Value::I64(i64::from_le_bytes(self.array("an i64")?)),
            12 => Value::F64(f64::from_le_bytes(self.array("an f64")?)),
            other => return Err(self.corrupt(format!("unknown metadata value type {other}"))),
        })
    }
}

impl GgufFile {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this value; troupe never writes a model
        // file in place (artifacts are verified copies, replaced only by rename).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, map)
    }

    fn parse(path: &Path, map: memmap2::Mmap) -> Result<Self, GgufError> {
        let mut cursor = Cursor {
            bytes: &map,
            at: 0,
            path,
        };
        if map.len() < 4 || &map[..4] != MAGIC {
            return Err(GgufError::NotGguf {
                path: path.to_owned(),
            });
        }
        cursor.at = 4;
        let version = cursor.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version {
                path: path.to_owned(),
                version,
            });
        }
        // A tensor entry is at least a name length, a dimension count, a type and an offset.
        let tensor_count = cursor.count(24, "the tensor count")?;
        let kv_count = cursor.count(12, "the metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = cursor.string("a metadata key's length")?;
            let kind = cursor.u32("a metadata value's type")?;
            let value = cursor.value(kind, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(cursor.corrupt(format!("metadata key {key} appears twice")));
            }
        }
        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(tensor_count);
        for _ in 0..tensor_count {
            let name = cursor.string("a tensor name's length")?;
            let n_dims = cursor.u32("a tensor's dimension count")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(cursor.corrupt(format!(
                    "tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS})"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(cursor.u64("a tensor dimension")?);
            }
            let kind = cursor.u32("a tensor's type")?;
            let offset = cursor.u64("a tensor's offset")?;
            let ggml_type = GgmlType::from_id(kind).ok_or_else(|| GgufError::Unsupported {
                path: path.to_owned(),
                reason: format!(
                    "tensor {name} has ggml type {kind}, which troupe does not read (it reads {})",
                    GgmlType::SUPPORTED
                ),
            })?;
            let size = tensor_size(&dims, ggml_type).map_err(|problem| GgufError::Tensor {
                path: path.to_owned(),
                name: name.clone(),
                problem,
            })?;
            if tensors.iter().any(|t| t.name == name) {
                return Err(cursor.corrupt(format!("tensor {name} appears twice")));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                size,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(value) => match value.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                _ => {
                    return Err(GgufError::Metadata {
                        path: path.to_owned(),
                        key: "general.alignment".into(),
                        problem: format!("{value:?}, not a power of two"),
                    })
                }
            },
        };
        let data_start = (cursor.at as u64).div_ceil(alignment) * alignment;
        let data_len = (map.len() as u64).saturating_sub(data_start);
        for tensor in &tensors {
            let problem = if !tensor.offset.is_multiple_of(alignment) {
                Some(format!(
                    "at data offset {}, not a multiple of the alignment {alignment}",
                    tensor.offset
                ))
            } else if tensor
                .offset
                .checked_add(tensor.size)
                .is_none_or(|end| end > data_len)
            {
                Some(format!(
                    "{} bytes at data offset {}, past the end of the file ({data_len} data bytes): the file is truncated",
                    tensor.size, tensor.offset
                ))
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(GgufError::Tensor {
                    path: path.to_owned(),
                    name: tensor.name.clone(),
                    problem,
                });
            }
        }
        Ok(Self {
            path: path.to_owned(),
            map,
            version,
            metadata,
            tensors,
            data_start,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor's raw bytes (checked to lie inside the file when it was opened).
    pub fn data(&self, tensor: &TensorInfo) -> &[u8] {
        let start = (self.data_start + tensor.offset) as usize;
        &self.map[start..start + tensor.size as usize]
    }

    /// Metadata value `key`, which must be present.
    pub fn get(&self, key: &str) -> Result<&Value, GgufError> {
        self.metadata
            .get(key)
            .ok_or_else(|| self.bad_key(key, "missing"))
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get(key)?
            .as_u64()
            .ok_or_else(|| self.bad_key(key, "not a non-negative integer"))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        self.get(key)?
            .as_f64()
            .ok_or_else(|| self.bad_key(key, "not a number"))
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.get(key)?
            .as_str()
            .ok_or_else(|| self.bad_key(key, "not a string"))
    }

    /// An array of strings.
    pub fn get_strings(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        self.get(key)?
            .as_array()
            .and_then(|items| items.iter().map(Value::as_str).collect())
            .ok_or_else(|| self.bad_key(key, "not an array of strings"))
    }

    /// An array of integers.
    pub fn get_ints(&self, key: &str) -> Result<Vec<i64>, GgufError> {
        self.get(key)?
            .as_array()
            .and_then(|items| {
                items
                    .iter()
                    .map(|v| match *v {
                        Value::I32(i) => Some(i64::from(i)),
                        Value::I64(i) => Some(i),
                        ref other => other.as_u64().and_then(|u| i64::try_from(u).ok()),
                    })
                    .collect()
            })
            .ok_or_else(|| self.bad_key(key, "not an array of integers"))
    }

    fn bad_key(&self, key: &str, problem: &str) -> GgufError {
        GgufError::Metadata {
            path: self.path.clone(),
            key: key.to_owned(),
            problem: problem.to_owned(),
        }
    }

    /// A tensor dequantised to f32, in ggml order (innermost dimension first in memory).
    pub fn dequantize(&self, tensor: &TensorInfo) -> Vec<f32> {
        let mut out = vec![0f32; tensor.elements() as usize];
        tensor.ggml_type.dequantize(self.data(tensor), &mut out);
        out
    }
}

/// The bytes of a tensor of `dims` and `kind`; the innermost dimension must be a whole
/// number of blocks.
fn tensor_size(dims: &[u64], kind: GgmlType) -> Result<u64, String> {
    let elements = dims
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= isize::MAX as u64)
        .ok_or_else(|| format!("{dims:?}: too many elements"))?;
    let block = kind.block_elements() as u64;
    if !dims[0].is_multiple_of(block) {
        return Err(format!(
            "{dims:?} of {kind}: its rows of {} are not whole blocks of {block}",
            dims[0]
        ));
    }
    Ok(elements / block * kind.block_bytes() as u64)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a GGUF v3 file: `metadata` as (key, type id, encoded value), tensors as (name,
    /// dims, type, data).
    pub(crate) fn write_gguf(
        path: &Path,
        metadata: &[(&str, u32, Vec<u8>)],
        tensors: &[(&str, Vec<u64>, GgmlType, Vec<u8>)],
    ) {
        let mut out = Vec::new();
        let string = |out: &mut Vec<u8>, s: &str| {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        };
        out.extend(MAGIC);
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((metadata.len() as u64).to_le_bytes());
        for (key, kind, value) in metadata {
            string(&mut out, key);
            out.extend(kind.to_le_bytes());
            out.extend(value);
        }
        let mut offset = 0u64;
        for (name, dims, kind, data) in tensors {
            string(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(kind.id().to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        for (_, _, _, data) in tensors {
            out.extend(data);
            out.resize(out.len().div_ceil(32) * 32, 0);
        }
        std::fs::write(path, out).unwrap();
    }

    pub(crate) fn gguf_string(s: &str) -> Vec<u8> {
        let mut out = (s.len() as u64).to_le_bytes().to_vec();
        out.extend(s.as_bytes());
        out
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn reads_metadata_and_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let mut strings = 8u32.to_le_bytes().to_vec();
        strings.extend(2u64.to_le_bytes());
        strings.extend(gguf_string("a"));
        strings.extend(gguf_string("b c"));
        write_gguf(
            &path,
            &[
                ("general.architecture", 8, gguf_string("llama")),
                ("llama.block_count", 4, 30u32.to_le_bytes().to_vec()),
                ("llama.rope.freq_base", 6, 1e5f32.to_le_bytes().to_vec()),
                ("tokenizer.ggml.merges", 9, strings),
            ],
            &[
                ("norm", vec![3], GgmlType::F32, f32_bytes(&[1.0, 2.0, 3.0])),
                (
                    "w",
                    vec![2, 2],
                    GgmlType::F32,
                    f32_bytes(&[1.0, 2.0, 3.0, 4.0]),
                ),
            ],
        );
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(file.get_u64("llama.block_count").unwrap(), 30);
        assert_eq!(file.get_f64("llama.rope.freq_base").unwrap(), 1e5);
        assert_eq!(
            file.get_strings("tokenizer.ggml.merges").unwrap(),
            ["a", "b c"]
        );
        let w = file.tensor("w").unwrap();
        assert_eq!(w.shape(), [2, 2]);
        assert_eq!(file.dequantize(w), [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(
            file.dequantize(file.tensor("norm").unwrap()),
            [1.0, 2.0, 3.0]
        );
        let error = file
            .get_u64("general.architecture")
            .unwrap_err()
            .to_string();
        assert!(error.contains("not a non-negative integer"), "{error}");
    }

    #[test]
    fn refuses_damaged_files_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let data = f32_bytes(&[0.0; 64]);
        write_gguf(&path, &[], &[("w", vec![8, 8], GgmlType::F32, data)]);
        let good = std::fs::read(&path).unwrap();
        let open = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            GgufFile::open(&path).unwrap_err().to_string()
        };
        assert!(open(b"GGML").contains("not a GGUF file"));
        assert!(open(&good[..good.len() - 4]).contains("truncated"));
        assert!(open(&good[..40]).contains("file ends"));
        let mut version = good.clone();
        version[4] = 9;
        assert!(open(&version).contains("version 9"));
        // A tensor count that the file cannot hold: refused before anything is allocated.
        let mut count = good.clone();
        count[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(open(&count).contains("tensor count"));
        // A type id ggml does not have.
        // The header (24 bytes), then the name ("w"), the dimension count and 2 dimensions.
        let type_at = 24 + 8 + 1 + 4 + 16;
        let mut kind = good.clone();
        assert_eq!(kind[type_at..type_at + 4], 0u32.to_le_bytes());
        kind[type_at..type_at + 4].copy_from_slice(&77u32.to_le_bytes());
        assert!(open(&kind).contains("ggml type 77"));
        // Rows that are not whole blocks.
        kind[type_at..type_at + 4].copy_from_slice(&GgmlType::Q8_0.id().to_le_bytes());
        assert!(open(&kind).contains("not whole blocks of 32"));
    }
}
