//! The checkpoint folder format, as the worker writes and restores it and `stagecoach export`
//! checks it: the file names, the manifest, a safetensors header read from bytes, and the
//! tensors a transformers `LlamaForCausalLM` `config.json` implies. Pure: callers read the
//! files and hand over their bytes or parsed JSON.
//!
//! ```text
//! <checkpoint>/
//!   model.safetensors       the weights under LlamaForCausalLM's names
//!   config.json             the LlamaConfig
//!   optimizer.safetensors   "<name>.exp_avg" and "<name>.exp_avg_sq" per parameter
//!   manifest.json           format, job, step, optimizer_steps, stage, cursors, stage_taken,
//!                           parent, generation, rope_theta, created_unix_ms, and per file its
//!                           size and sha256
//! ```
//!
//! A resume relies on every manifest field ([`Manifest::parse_complete`]); an export only on
//! the format and the file digests ([`Manifest::parse`], the other fields defaulting).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The manifest's `format`.
pub const FORMAT: &str = "stagecoach-checkpoint/1";
pub const MANIFEST: &str = "manifest.json";
pub const MODEL: &str = "model.safetensors";
pub const CONFIG: &str = "config.json";
pub const OPTIMIZER: &str = "optimizer.safetensors";

/// The files a checkpoint holds besides its manifest, in the order they are written.
pub const FILES: [&str; 3] = [MODEL, CONFIG, OPTIMIZER];

/// The files of a checkpoint that make a transformers model folder (what an export copies).
pub const MODEL_FILES: [&str; 2] = [MODEL, CONFIG];

/// Lowercase hex of `bytes` (how the manifest writes a sha256).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(2 * bytes.len());
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Size and digest of one file of the folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub bytes: u64,
    /// Lowercase hex.
    pub sha256: String,
}

/// `manifest.json`. Every field but `format` and `files` defaults when absent, so that a reader
/// that needs only those ([`Manifest::parse`]) is not refused a folder it can use; a resume
/// checks that all are there ([`Manifest::parse_complete`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    #[serde(default)]
    pub job: String,
    /// Committed steps, including steps whose update the guard dropped.
    #[serde(default)]
    pub step: u64,
    /// AdamW's step count (its bias correction continues from it).
    #[serde(default)]
    pub optimizer_steps: u64,
    #[serde(default)]
    pub stage: u32,
    /// Per-source cursors and the stage's round-robin counts, as the coordinator sent them.
    #[serde(default)]
    pub cursors: Vec<u64>,
    #[serde(default)]
    pub stage_taken: Vec<u64>,
    /// The checkpoint the run had restored from before this one ("" for the first lineage).
    #[serde(default)]
    pub parent: String,
    #[serde(default)]
    pub generation: u64,
    /// The RoPE θ the model computed with when the checkpoint was taken.
    #[serde(default)]
    pub rope_theta: f64,
    #[serde(default)]
    pub created_unix_ms: u64,
    /// Size and sha256 of each file of the folder, by name.
    pub files: BTreeMap<String, FileEntry>,
}

/// What is wrong with a `manifest.json` (the caller names the file).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ManifestError {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("no \"format\" field; a stagecoach checkpoint says \"format\": {FORMAT:?}")]
    NoFormat,
    #[error("format is {0}; this stagecoach reads {FORMAT:?} only")]
    Format(String),
    #[error("no {0:?} field")]
    MissingField(&'static str),
    /// A field has the wrong type (the serde message says which).
    #[error("not a valid manifest: {0}")]
    Invalid(String),
    #[error("the sha256 of {file}, {sha256:?}, is not 64 hex digits")]
    Digest { file: String, sha256: String },
    #[error("\"files\" lists no {0}; the checkpoint is incomplete")]
    Unlisted(&'static str),
}

impl Manifest {
    /// Every field a manifest of this format holds.
    pub const FIELDS: [&'static str; 12] = [
        "format",
        "job",
        "step",
        "optimizer_steps",
        "stage",
        "cursors",
        "stage_taken",
        "parent",
        "generation",
        "rope_theta",
        "created_unix_ms",
        "files",
    ];

    /// Parses `manifest.json`: the format must be this one and every digest well-formed;
    /// fields other than `format` and `files` default when absent.
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| ManifestError::Json(e.to_string()))?;
        Manifest::from_value(v)
    }

    /// [`parse`](Self::parse), also refusing a manifest that lacks any of [`Self::FIELDS`]
    /// (what a resume needs).
    pub fn parse_complete(text: &str) -> Result<Manifest, ManifestError> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| ManifestError::Json(e.to_string()))?;
        check_format(&v)?;
        if let Some(field) = Manifest::missing_fields(&v).first() {
            return Err(ManifestError::MissingField(field));
        }
        Manifest::from_value(v)
    }

    /// The fields of [`Self::FIELDS`] that `v` lacks, in that order.
    pub fn missing_fields(v: &Value) -> Vec<&'static str> {
        Manifest::FIELDS
            .into_iter()
            .filter(|f| v.get(f).is_none())
            .collect()
    }

    fn from_value(v: Value) -> Result<Manifest, ManifestError> {
        check_format(&v)?;
        let m: Manifest =
            serde_json::from_value(v).map_err(|e| ManifestError::Invalid(e.to_string()))?;
        for (file, entry) in &m.files {
            if !is_sha256(&entry.sha256) {
                return Err(ManifestError::Digest {
                    file: file.clone(),
                    sha256: entry.sha256.clone(),
                });
            }
        }
        Ok(m)
    }

    /// The entry of `name` (one of [`FILES`]).
    pub fn entry(&self, name: &'static str) -> Result<&FileEntry, ManifestError> {
        self.files.get(name).ok_or(ManifestError::Unlisted(name))
    }
}

fn check_format(v: &Value) -> Result<(), ManifestError> {
    match v.get("format") {
        Some(Value::String(f)) if f == FORMAT => Ok(()),
        Some(f) => Err(ManifestError::Format(f.to_string())),
        None => Err(ManifestError::NoFormat),
    }
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

// --- safetensors ---------------------------------------------------------------------------------

/// An element type of a safetensors file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    F8E5M2,
    F8E4M3,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
}

impl Dtype {
    const ALL: [Dtype; 15] = [
        Dtype::Bool,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8E5M2,
        Dtype::F8E4M3,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::F64,
        Dtype::I64,
        Dtype::U64,
    ];

    /// The name in a safetensors header (`"F32"`, `"BF16"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
        }
    }

    pub fn from_name(name: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E5M2 | Dtype::F8E4M3 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
        }
    }

    /// The dtype a transformers `torch_dtype` names (`"float32"`, `"bfloat16"`, `"float16"`).
    pub fn from_torch(name: &str) -> Option<Dtype> {
        match name {
            "float32" | "float" => Some(Dtype::F32),
            "bfloat16" => Some(Dtype::BF16),
            "float16" | "half" => Some(Dtype::F16),
            _ => None,
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor of a safetensors header. `data_offsets` are relative to the data, which starts
/// right after the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub data_offsets: (u64, u64),
}

impl TensorInfo {
    pub fn numel(&self) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d))
    }
}

/// The header of a safetensors file: an 8-byte little-endian length `n`, then `n` bytes of JSON
/// (tensor name → dtype, shape, data_offsets; `__metadata__` → strings), then the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// `n`: bytes of JSON (its padding included).
    pub json_len: u64,
    pub metadata: BTreeMap<String, String>,
    pub tensors: BTreeMap<String, TensorInfo>,
}

/// What is wrong with a safetensors file (the caller names the file).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HeaderError {
    #[error(
        "{0} bytes: too short for a safetensors file (it starts with an 8-byte header length)"
    )]
    TooShort(u64),
    #[error("the header length is {len} bytes but {available} bytes follow it; not a safetensors file, or a truncated one")]
    Length { len: u64, available: u64 },
    #[error("the header length is {0} bytes, more than the {max} a safetensors header may have", max = Header::MAX_JSON_LEN)]
    TooLong(u64),
    #[error("the header is not a JSON object: {0}")]
    Json(String),
    #[error("tensor {name}: {reason}")]
    Tensor { name: String, reason: String },
    #[error("\"__metadata__\" is not an object of strings")]
    Metadata,
    #[error("the tensors' data ends at byte {end} of the data but the file holds {len} bytes of data after the header (truncated, or bytes appended)")]
    DataLength { end: u64, len: u64 },
}

impl Header {
    /// The largest header this reader accepts (the safetensors library's own limit).
    pub const MAX_JSON_LEN: u64 = 100_000_000;

    /// Where the data starts in the file.
    pub fn data_start(&self) -> u64 {
        8 + self.json_len
    }

    /// The header's JSON length, from the file's first 8 bytes (`prefix` may be longer);
    /// checked against the file's length `file_len` and [`Self::MAX_JSON_LEN`].
    pub fn json_len(prefix: &[u8], file_len: u64) -> Result<u64, HeaderError> {
        let Some(first) = prefix.get(..8) else {
            return Err(HeaderError::TooShort(file_len.min(prefix.len() as u64)));
        };
        let mut le = [0u8; 8];
        le.copy_from_slice(first);
        let len = u64::from_le_bytes(le);
        if len > Header::MAX_JSON_LEN {
            return Err(HeaderError::TooLong(len));
        }
        let available = file_len.saturating_sub(8);
        if len > available {
            return Err(HeaderError::Length { len, available });
        }
        Ok(len)
    }

    /// Parses and checks the header of a file of `file_len` bytes whose first bytes are
    /// `prefix` (the whole file, or at least its length and JSON). Checks: the length is sane
    /// and within the file; the JSON is an object of tensors with a known dtype, a shape and
    /// data offsets; each tensor's bytes are its dtype's size times its element count; the
    /// tensors tile the data exactly (in offset order, from 0, no overlap, no gap, to the end
    /// of the file).
    pub fn parse(prefix: &[u8], file_len: u64) -> Result<Header, HeaderError> {
        let json_len = Header::json_len(prefix, file_len)?;
        let end = 8 + json_len as usize;
        let Some(json) = prefix.get(8..end) else {
            return Err(HeaderError::Length {
                len: json_len,
                available: prefix.len().saturating_sub(8) as u64,
            });
        };
        let v: Value =
            serde_json::from_slice(json).map_err(|e| HeaderError::Json(e.to_string()))?;
        let Value::Object(entries) = v else {
            return Err(HeaderError::Json("not an object".into()));
        };
        let mut metadata = BTreeMap::new();
        let mut tensors = BTreeMap::new();
        for (name, entry) in entries {
            if name == "__metadata__" {
                let Value::Object(m) = entry else {
                    return Err(HeaderError::Metadata);
                };
                for (k, v) in m {
                    let Value::String(s) = v else {
                        return Err(HeaderError::Metadata);
                    };
                    metadata.insert(k, s);
                }
                continue;
            }
            let info = tensor_info(&entry).map_err(|reason| HeaderError::Tensor {
                name: name.clone(),
                reason,
            })?;
            tensors.insert(name, info);
        }
        let header = Header {
            json_len,
            metadata,
            tensors,
        };
        header.check_offsets(file_len - 8 - json_len)?;
        Ok(header)
    }

    fn check_offsets(&self, data_len: u64) -> Result<(), HeaderError> {
        let mut by_offset: Vec<(&String, &TensorInfo)> = self.tensors.iter().collect();
        by_offset.sort_by_key(|(name, t)| (t.data_offsets, name.as_str()));
        let mut at = 0u64;
        for (name, t) in by_offset {
            let bad = |reason: String| HeaderError::Tensor {
                name: name.clone(),
                reason,
            };
            let (begin, end) = t.data_offsets;
            if end < begin {
                return Err(bad(format!(
                    "data_offsets [{begin}, {end}] end before they begin"
                )));
            }
            let want = t
                .numel()
                .and_then(|n| n.checked_mul(t.dtype.size()))
                .ok_or_else(|| bad(format!("shape {:?} is too large", t.shape)))?;
            if end - begin != want {
                return Err(bad(format!(
                    "data_offsets [{begin}, {end}] hold {} bytes but {} of shape {:?} take {want}",
                    end - begin,
                    t.dtype,
                    t.shape
                )));
            }
            if begin < at {
                return Err(bad(format!(
                    "data_offsets [{begin}, {end}] overlap the tensor before, which ends at {at}"
                )));
            }
            if begin > at {
                return Err(bad(format!(
                    "data_offsets [{begin}, {end}] leave bytes {at}..{begin} of the data unused"
                )));
            }
            at = end;
        }
        if at != data_len {
            return Err(HeaderError::DataLength {
                end: at,
                len: data_len,
            });
        }
        Ok(())
    }

    /// The bytes of a header for `tensors` (name, dtype, shape) stored in that order one after
    /// the other: the length, then the JSON (keys sorted, `metadata` as `__metadata__`) padded
    /// with spaces so that the data starts 8-byte aligned, as the safetensors library writes it.
    pub fn encode<'a>(
        metadata: &BTreeMap<String, String>,
        tensors: impl IntoIterator<Item = (&'a str, Dtype, &'a [u64])>,
    ) -> Vec<u8> {
        let mut map = serde_json::Map::new();
        if !metadata.is_empty() {
            map.insert("__metadata__".into(), serde_json::json!(metadata));
        }
        let mut offset = 0u64;
        for (name, dtype, shape) in tensors {
            let len = shape.iter().product::<u64>() * dtype.size();
            map.insert(
                name.to_owned(),
                serde_json::json!({
                    "dtype": dtype.name(),
                    "shape": shape,
                    "data_offsets": [offset, offset + len],
                }),
            );
            offset += len;
        }
        let mut json = Value::Object(map).to_string().into_bytes();
        json.resize(json.len().next_multiple_of(8), b' ');
        let mut out = Vec::with_capacity(8 + json.len());
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        out
    }
}

fn tensor_info(entry: &Value) -> Result<TensorInfo, String> {
    let dtype = match entry.get("dtype") {
        Some(Value::String(s)) => {
            Dtype::from_name(s).ok_or_else(|| format!("unknown dtype {s:?}"))?
        }
        _ => return Err("no \"dtype\" string".into()),
    };
    let shape = entry
        .get("shape")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>())
        .ok_or("no \"shape\" array of non-negative integers")?;
    let offsets = entry
        .get("data_offsets")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>())
        .filter(|o| o.len() == 2)
        .ok_or("no \"data_offsets\" pair of non-negative integers")?;
    Ok(TensorInfo {
        dtype,
        shape,
        data_offsets: (offsets[0], offsets[1]),
    })
}

// --- what config.json implies ------------------------------------------------------------------

/// The tensors a transformers `LlamaForCausalLM` of a given `config.json` loads: names and
/// shapes in the model's order, and the dtype its `torch_dtype` names (none: any float type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlamaLayout {
    pub tensors: Vec<(String, Vec<u64>)>,
    pub dtype: Option<Dtype>,
    /// The output head is the input embedding (no `lm_head.weight` in the file).
    pub tied: bool,
}

/// What is wrong with a `config.json` as a Llama config (the caller names the file).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("not a JSON object")]
    NotObject,
    #[error("model_type is {0}; a LlamaForCausalLM config says \"model_type\": \"llama\"")]
    ModelType(String),
    #[error("architectures is {0}; a LlamaForCausalLM config lists \"LlamaForCausalLM\"")]
    Architectures(String),
    #[error("{key} is {value}; it must be a positive integer")]
    NotPositive { key: &'static str, value: String },
    #[error("{key} is {value}; it must be true or false")]
    NotBool { key: &'static str, value: String },
    #[error("{0}")]
    Inconsistent(String),
    #[error("torch_dtype is {0:?}; expected float32, bfloat16 or float16")]
    Dtype(String),
}

impl LlamaLayout {
    /// The layout `config` (a parsed `config.json`) implies, with transformers' defaults:
    /// `num_key_value_heads` = `num_attention_heads`, `head_dim` = `hidden_size /
    /// num_attention_heads`, `tie_word_embeddings` false, no biases.
    pub fn of_config(config: &Value) -> Result<LlamaLayout, ConfigError> {
        if !config.is_object() {
            return Err(ConfigError::NotObject);
        }
        match config.get("model_type") {
            Some(Value::String(t)) if t == "llama" => {}
            Some(other) => return Err(ConfigError::ModelType(other.to_string())),
            None => return Err(ConfigError::ModelType("absent".into())),
        }
        if let Some(archs) = config.get("architectures").filter(|a| !a.is_null()) {
            let lists = archs
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == "LlamaForCausalLM"));
            if !lists {
                return Err(ConfigError::Architectures(archs.to_string()));
            }
        }
        let int = |key: &'static str| -> Result<Option<u64>, ConfigError> {
            match config.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(n) if n > 0 => Ok(Some(n)),
                    _ => Err(ConfigError::NotPositive {
                        key,
                        value: v.to_string(),
                    }),
                },
            }
        };
        let required = |key: &'static str| -> Result<u64, ConfigError> {
            int(key)?.ok_or(ConfigError::NotPositive {
                key,
                value: "absent".into(),
            })
        };
        let flag = |key: &'static str| -> Result<bool, ConfigError> {
            match config.get(key) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => Err(ConfigError::NotBool {
                    key,
                    value: v.to_string(),
                }),
            }
        };
        let vocab = required("vocab_size")?;
        let hidden = required("hidden_size")?;
        let ffn = required("intermediate_size")?;
        let layers = required("num_hidden_layers")?;
        let heads = required("num_attention_heads")?;
        let kv_heads = int("num_key_value_heads")?.unwrap_or(heads);
        if heads % kv_heads != 0 {
            return Err(ConfigError::Inconsistent(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )));
        }
        let head_dim = match int("head_dim")? {
            Some(d) => d,
            None if hidden % heads == 0 => hidden / heads,
            None => {
                return Err(ConfigError::Inconsistent(format!(
                    "no head_dim, and hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
                )))
            }
        };
        let tied = flag("tie_word_embeddings")?;
        let (attention_bias, mlp_bias) = (flag("attention_bias")?, flag("mlp_bias")?);
        let dtype = match config.get("torch_dtype").or_else(|| config.get("dtype")) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => {
                Some(Dtype::from_torch(s).ok_or_else(|| ConfigError::Dtype(s.clone()))?)
            }
            Some(v) => return Err(ConfigError::Dtype(v.to_string())),
        };
        let (q, kv) = (heads * head_dim, kv_heads * head_dim);
        let mut tensors = vec![("model.embed_tokens.weight".to_owned(), vec![vocab, hidden])];
        for i in 0..layers {
            let p = format!("model.layers.{i}");
            let mut add = |name: String, shape: Vec<u64>| tensors.push((name, shape));
            add(format!("{p}.input_layernorm.weight"), vec![hidden]);
            for (proj, out, inp) in [
                ("q_proj", q, hidden),
                ("k_proj", kv, hidden),
                ("v_proj", kv, hidden),
                ("o_proj", hidden, q),
            ] {
                add(format!("{p}.self_attn.{proj}.weight"), vec![out, inp]);
                if attention_bias {
                    add(format!("{p}.self_attn.{proj}.bias"), vec![out]);
                }
            }
            add(format!("{p}.post_attention_layernorm.weight"), vec![hidden]);
            for (proj, out, inp) in [
                ("gate_proj", ffn, hidden),
                ("up_proj", ffn, hidden),
                ("down_proj", hidden, ffn),
            ] {
                add(format!("{p}.mlp.{proj}.weight"), vec![out, inp]);
                if mlp_bias {
                    add(format!("{p}.mlp.{proj}.bias"), vec![out]);
                }
            }
        }
        tensors.push(("model.norm.weight".to_owned(), vec![hidden]));
        if !tied {
            tensors.push(("lm_head.weight".to_owned(), vec![vocab, hidden]));
        }
        Ok(LlamaLayout {
            tensors,
            dtype,
            tied,
        })
    }

    /// How `header`'s tensors differ from this layout: missing ones first (in the model's
    /// order), then wrong shapes or dtypes, then tensors the model has no place for. Empty when
    /// transformers loads every tensor as it is. Tensors transformers ignores
    /// (`*.rotary_emb.inv_freq`) and, when tied, an `lm_head.weight` of the embedding's shape
    /// are accepted.
    pub fn mismatches(&self, header: &Header) -> Vec<Mismatch> {
        let mut out = Vec::new();
        let mut wrong = Vec::new();
        for (name, shape) in &self.tensors {
            match header.tensors.get(name) {
                None => out.push(Mismatch::Missing {
                    name: name.clone(),
                    shape: shape.clone(),
                }),
                Some(t) if &t.shape != shape => wrong.push(Mismatch::Shape {
                    name: name.clone(),
                    found: t.shape.clone(),
                    implied: shape.clone(),
                }),
                Some(t) if !self.accepts(t.dtype) => wrong.push(Mismatch::Dtype {
                    name: name.clone(),
                    found: t.dtype,
                    implied: self.dtype,
                }),
                Some(_) => {}
            }
        }
        out.extend(wrong);
        let known: std::collections::HashSet<&str> =
            self.tensors.iter().map(|(n, _)| n.as_str()).collect();
        let embedding = self.tensors.first().map(|(_, s)| s);
        for (name, t) in &header.tensors {
            let ignored = name.ends_with("rotary_emb.inv_freq")
                || (self.tied && name == "lm_head.weight" && Some(&t.shape) == embedding);
            if !known.contains(name.as_str()) && !ignored {
                out.push(Mismatch::Extra {
                    name: name.clone(),
                    shape: t.shape.clone(),
                });
            }
        }
        out
    }

    fn accepts(&self, dtype: Dtype) -> bool {
        match self.dtype {
            Some(d) => d == dtype,
            None => matches!(dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16),
        }
    }
}

/// One way a file's tensors differ from what `config.json` implies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    Missing {
        name: String,
        shape: Vec<u64>,
    },
    Extra {
        name: String,
        shape: Vec<u64>,
    },
    Shape {
        name: String,
        found: Vec<u64>,
        implied: Vec<u64>,
    },
    Dtype {
        name: String,
        found: Dtype,
        implied: Option<Dtype>,
    },
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mismatch::Missing { name, shape } => write!(
                f,
                "no tensor {name}, which config.json implies (shape {shape:?})"
            ),
            Mismatch::Extra { name, shape } => write!(
                f,
                "tensor {name} (shape {shape:?}) is not part of the model config.json describes"
            ),
            Mismatch::Shape {
                name,
                found,
                implied,
            } => write!(
                f,
                "tensor {name} has shape {found:?} but config.json implies {implied:?}"
            ),
            Mismatch::Dtype {
                name,
                found,
                implied: Some(d),
            } => write!(
                f,
                "tensor {name} is {found} but config.json's torch_dtype implies {d}"
            ),
            Mismatch::Dtype {
                name,
                found,
                implied: None,
            } => write!(f, "tensor {name} is {found}, not a floating-point type"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hex_is_lowercase_two_digits_per_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xab, 0xff]), "000fabff");
        assert_eq!(hex(&[]), "");
    }

    fn manifest_value() -> Value {
        json!({
            "format": FORMAT, "job": "demo", "step": 12, "optimizer_steps": 11, "stage": 1,
            "cursors": [1, 2], "stage_taken": [3, 4], "parent": "", "generation": 2,
            "rope_theta": 10000.0, "created_unix_ms": 5,
            "files": {MODEL: {"bytes": 3, "sha256": "a".repeat(64)}},
        })
    }

    #[test]
    fn a_manifest_parses_leniently_or_completely() {
        let v = manifest_value();
        let m = Manifest::parse_complete(&v.to_string()).unwrap();
        assert_eq!((m.step, m.optimizer_steps, m.stage), (12, 11, 1));
        assert_eq!(Manifest::parse(&v.to_string()).unwrap(), m);
        assert_eq!(m.entry(MODEL).unwrap().bytes, 3);
        assert_eq!(m.entry(CONFIG), Err(ManifestError::Unlisted(CONFIG)));
        // Round trip.
        let again = Manifest::parse_complete(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(again, m);

        // Without optimizer_steps and job: the lenient reader defaults them, the strict one
        // names the first missing field.
        let mut partial = v.clone();
        partial.as_object_mut().unwrap().remove("optimizer_steps");
        partial.as_object_mut().unwrap().remove("job");
        assert_eq!(
            Manifest::missing_fields(&partial),
            ["job", "optimizer_steps"]
        );
        let lenient = Manifest::parse(&partial.to_string()).unwrap();
        assert_eq!((lenient.job.as_str(), lenient.optimizer_steps), ("", 0));
        let err = Manifest::parse_complete(&partial.to_string()).unwrap_err();
        assert_eq!(err.to_string(), "no \"job\" field");
    }

    #[test]
    fn bad_manifests_are_refused_by_both_readers() {
        let both = |v: &Value| {
            let text = v.to_string();
            let a = Manifest::parse(&text).unwrap_err();
            let b = Manifest::parse_complete(&text).unwrap_err();
            assert_eq!(a, b);
            a.to_string()
        };
        let mut v = manifest_value();
        v["format"] = json!("stagecoach-checkpoint/9");
        assert_eq!(
            both(&v),
            "format is \"stagecoach-checkpoint/9\"; this stagecoach reads \"stagecoach-checkpoint/1\" only"
        );
        v.as_object_mut().unwrap().remove("format");
        assert!(both(&v).starts_with("no \"format\" field"));
        let mut v = manifest_value();
        v["files"][MODEL]["sha256"] = json!("xyz");
        assert_eq!(
            both(&v),
            "the sha256 of model.safetensors, \"xyz\", is not 64 hex digits"
        );
        let mut v = manifest_value();
        v["step"] = json!("twelve");
        assert!(
            both(&v).starts_with("not a valid manifest: "),
            "{}",
            both(&v)
        );
        let mut v = manifest_value();
        v.as_object_mut().unwrap().remove("files");
        assert!(Manifest::parse(&v.to_string()).is_err());
        assert!(Manifest::parse("{\"format\":")
            .unwrap_err()
            .to_string()
            .starts_with("not valid JSON"));
    }

    /// A file of `tensors` (zero-filled data) as `Header::encode` lays it out.
    fn file(tensors: &[(&str, Dtype, &[u64])]) -> Vec<u8> {
        let meta = BTreeMap::from([("format".to_owned(), "pt".to_owned())]);
        let mut bytes = Header::encode(&meta, tensors.iter().map(|&(n, d, s)| (n, d, s)));
        let data: u64 = tensors
            .iter()
            .map(|(_, d, s)| s.iter().product::<u64>() * d.size())
            .sum();
        bytes.resize(bytes.len() + data as usize, 0);
        bytes
    }

    #[test]
    fn headers_round_trip() {
        let bytes = file(&[("b", Dtype::F32, &[2, 3]), ("a", Dtype::BF16, &[5])]);
        let h = Header::parse(&bytes, bytes.len() as u64).unwrap();
        assert_eq!(h.data_start() % 8, 0);
        assert_eq!(h.metadata["format"], "pt");
        assert_eq!(
            h.tensors["b"],
            TensorInfo {
                dtype: Dtype::F32,
                shape: vec![2, 3],
                data_offsets: (0, 24)
            }
        );
        assert_eq!(h.tensors["a"].data_offsets, (24, 34));
        assert_eq!(h.data_start() + 34, bytes.len() as u64);
        // Only the header needed.
        let prefix = &bytes[..h.data_start() as usize];
        assert_eq!(Header::parse(prefix, bytes.len() as u64).unwrap(), h);
        // A scalar and an empty tensor.
        let bytes = file(&[("s", Dtype::I64, &[]), ("e", Dtype::F32, &[0, 4])]);
        let h = Header::parse(&bytes, bytes.len() as u64).unwrap();
        assert_eq!(h.tensors["s"].data_offsets, (0, 8));
        for d in Dtype::ALL {
            assert_eq!(Dtype::from_name(d.name()), Some(d));
        }
    }

    /// A file whose header JSON is `json` followed by `data` bytes.
    fn raw(json: &Value, data: usize) -> Vec<u8> {
        let text = json.to_string();
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(text.as_bytes());
        out.resize(out.len() + data, 0);
        out
    }

    #[test]
    fn broken_headers_are_refused_with_the_tensor_named() {
        let parse = |b: &[u8]| Header::parse(b, b.len() as u64).unwrap_err().to_string();
        assert!(parse(&[1, 2, 3]).contains("too short"));
        let mut huge = (u64::MAX).to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(parse(&huge).contains("more than the 100000000"));
        let mut long = 500u64.to_le_bytes().to_vec();
        long.extend_from_slice(b"{}");
        assert!(parse(&long).contains("header length is 500 bytes but 2 bytes follow"));
        let mut junk = 4u64.to_le_bytes().to_vec();
        junk.extend_from_slice(b"nope");
        assert!(parse(&junk).contains("not a JSON object"));

        let t = |dtype: &str, shape: Value, offsets: Value| json!({"dtype": dtype, "shape": shape, "data_offsets": offsets});
        let cases: Vec<(Value, usize, &str)> = vec![
            (
                json!({"w": t("F33", json!([2]), json!([0, 8]))}),
                8,
                "tensor w: unknown dtype \"F33\"",
            ),
            (
                json!({"w": {"dtype": "F32", "data_offsets": [0, 8]}}),
                8,
                "tensor w: no \"shape\"",
            ),
            (
                json!({"w": t("F32", json!([2]), json!([0]))}),
                8,
                "tensor w: no \"data_offsets\" pair",
            ),
            (
                json!({"w": t("F32", json!([3]), json!([0, 8]))}),
                8,
                "tensor w: data_offsets [0, 8] hold 8 bytes but F32 of shape [3] take 12",
            ),
            (
                json!({"a": t("F32", json!([2]), json!([0, 8])), "b": t("F32", json!([2]), json!([4, 12]))}),
                12,
                "tensor b: data_offsets [4, 12] overlap the tensor before, which ends at 8",
            ),
            (
                json!({"a": t("F32", json!([2]), json!([0, 8])), "b": t("F32", json!([2]), json!([16, 24]))}),
                24,
                "tensor b: data_offsets [16, 24] leave bytes 8..16 of the data unused",
            ),
            (
                json!({"w": t("F32", json!([2]), json!([8, 0]))}),
                8,
                "tensor w: data_offsets [8, 0] end before they begin",
            ),
            (
                json!({"w": t("F32", json!([2]), json!([0, 8]))}),
                12,
                "the tensors' data ends at byte 8 of the data but the file holds 12 bytes",
            ),
            (
                json!({"w": t("F32", json!([2]), json!([0, 8]))}),
                4,
                "the tensors' data ends at byte 8 of the data but the file holds 4 bytes",
            ),
            (
                json!({"__metadata__": {"format": 1}}),
                0,
                "\"__metadata__\" is not an object of strings",
            ),
        ];
        for (json, data, want) in cases {
            let err = parse(&raw(&json, data));
            assert!(err.contains(want), "{json}: {err:?} does not say {want:?}");
        }
    }

    fn config() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": 264, "hidden_size": 64, "intermediate_size": 176,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "tie_word_embeddings": true, "torch_dtype": "float32",
        })
    }

    #[test]
    fn a_llama_config_implies_its_tensors() {
        let layout = LlamaLayout::of_config(&config()).unwrap();
        assert!(layout.tied);
        assert_eq!(layout.dtype, Some(Dtype::F32));
        assert_eq!(layout.tensors.len(), 1 + 2 * 9 + 1);
        let shape = |name: &str| {
            layout
                .tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| s.clone())
                .unwrap_or_else(|| panic!("no {name}"))
        };
        assert_eq!(shape("model.embed_tokens.weight"), [264, 64]);
        assert_eq!(shape("model.layers.1.self_attn.q_proj.weight"), [64, 64]);
        assert_eq!(shape("model.layers.1.self_attn.k_proj.weight"), [32, 64]);
        assert_eq!(shape("model.layers.0.self_attn.v_proj.weight"), [32, 64]);
        assert_eq!(shape("model.layers.0.self_attn.o_proj.weight"), [64, 64]);
        assert_eq!(shape("model.layers.0.mlp.gate_proj.weight"), [176, 64]);
        assert_eq!(shape("model.layers.0.mlp.up_proj.weight"), [176, 64]);
        assert_eq!(shape("model.layers.0.mlp.down_proj.weight"), [64, 176]);
        assert_eq!(shape("model.layers.1.input_layernorm.weight"), [64]);
        assert_eq!(
            shape("model.layers.1.post_attention_layernorm.weight"),
            [64]
        );
        assert_eq!(shape("model.norm.weight"), [64]);
        assert!(!layout.tensors.iter().any(|(n, _)| n == "lm_head.weight"));

        // transformers' defaults: untied, kv heads = heads, head_dim = hidden / heads; biases.
        let mut c = config();
        for key in [
            "tie_word_embeddings",
            "num_key_value_heads",
            "head_dim",
            "torch_dtype",
        ] {
            c.as_object_mut().unwrap().remove(key);
        }
        c["attention_bias"] = json!(true);
        let layout = LlamaLayout::of_config(&c).unwrap();
        assert!(!layout.tied && layout.dtype.is_none());
        let names: Vec<&str> = layout.tensors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.last(), Some(&"lm_head.weight"));
        assert!(names.contains(&"model.layers.0.self_attn.k_proj.bias"));
        assert!(layout.tensors.contains(&(
            "model.layers.0.self_attn.k_proj.weight".into(),
            vec![64, 64]
        )));
    }

    #[test]
    fn configs_that_are_not_llama_are_refused() {
        let refuse = |edit: &dyn Fn(&mut Value)| {
            let mut c = config();
            edit(&mut c);
            LlamaLayout::of_config(&c).unwrap_err().to_string()
        };
        assert!(refuse(&|c| c["model_type"] = json!("gpt2")).contains("model_type is \"gpt2\""));
        assert!(refuse(&|c| {
            c.as_object_mut().unwrap().remove("model_type");
        })
        .contains("model_type is absent"));
        assert!(
            refuse(&|c| c["architectures"] = json!(["MistralForCausalLM"]))
                .contains("architectures is [\"MistralForCausalLM\"]")
        );
        assert!(refuse(&|c| c["hidden_size"] = json!(-3)).contains("hidden_size is -3"));
        assert!(refuse(&|c| {
            c.as_object_mut().unwrap().remove("vocab_size");
        })
        .contains("vocab_size is absent"));
        assert!(refuse(&|c| c["num_key_value_heads"] = json!(3)).contains("not a multiple"));
        assert!(refuse(&|c| c["tie_word_embeddings"] = json!("yes")).contains("true or false"));
        assert!(refuse(&|c| c["torch_dtype"] = json!("int8")).contains("torch_dtype is \"int8\""));
        assert_eq!(
            LlamaLayout::of_config(&json!([1])).unwrap_err(),
            ConfigError::NotObject
        );
    }

    #[test]
    fn tensors_are_checked_against_the_layout() {
        let layout = LlamaLayout::of_config(&config()).unwrap();
        let all: Vec<(&str, Dtype, &[u64])> = layout
            .tensors
            .iter()
            .map(|(n, s)| (n.as_str(), Dtype::F32, s.as_slice()))
            .collect();
        let header = |ts: &[(&str, Dtype, &[u64])]| {
            let b = file(ts);
            Header::parse(&b, b.len() as u64).unwrap()
        };
        assert_eq!(layout.mismatches(&header(&all)), []);
        // A tied head equal in shape, and RoPE's buffer, are accepted.
        let mut more = all.clone();
        more.push(("lm_head.weight", Dtype::F32, &[264, 64]));
        more.push((
            "model.layers.0.self_attn.rotary_emb.inv_freq",
            Dtype::F32,
            &[8],
        ));
        assert_eq!(layout.mismatches(&header(&more)), []);

        let mut bad = all.clone();
        bad.retain(|(n, _, _)| *n != "model.norm.weight");
        let i = bad
            .iter()
            .position(|(n, _, _)| *n == "model.layers.0.mlp.up_proj.weight")
            .unwrap();
        bad[i].2 = &[64, 176];
        let j = bad
            .iter()
            .position(|(n, _, _)| *n == "model.layers.1.input_layernorm.weight")
            .unwrap();
        bad[j].1 = Dtype::BF16;
        bad.push(("model.extra.weight", Dtype::F32, &[2]));
        let found: Vec<String> = layout
            .mismatches(&header(&bad))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            found,
            [
                "no tensor model.norm.weight, which config.json implies (shape [64])",
                "tensor model.layers.0.mlp.up_proj.weight has shape [64, 176] but config.json implies [176, 64]",
                "tensor model.layers.1.input_layernorm.weight is BF16 but config.json's torch_dtype implies F32",
                "tensor model.extra.weight (shape [2]) is not part of the model config.json describes",
            ]
        );
    }
}
