//! Interchange with transformers: a model folder holding `config.json` (a `LlamaConfig`) and
//! `model.safetensors` (or shards listed in `model.safetensors.index.json`) with
//! `LlamaForCausalLM` parameter names. Our checkpoints load in transformers and theirs in ours.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde_json::{json, Value};
use stagecoach_core::checkpoint::{self, Dtype, Header};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use crate::error::{Error, IoContext, Result};
use crate::model::ModelConfig;

/// The `config.json` transformers needs to build a `LlamaForCausalLM` of this shape.
pub fn config_json(c: &ModelConfig, dtype: Kind) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "initializer_range": c.init_std,
        "tie_word_embeddings": true,
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "torch_dtype": dtype_name(dtype),
    })
}

fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    }
}

/// Reads a transformers `config.json` into our shape. Refuses what our model cannot represent
/// (untied embeddings, biases, rope scaling, another activation) with the key to change.
pub fn read_config(path: &Path) -> Result<ModelConfig> {
    let text = std::fs::read_to_string(path).at(path)?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::checkpoint(path, format!("not valid JSON: {e}")))?;
    let bad = |reason: String| Error::checkpoint(path, reason);
    let int = |key: &str| -> Result<i64> {
        v.get(key)
            .and_then(Value::as_i64)
            .ok_or_else(|| bad(format!("missing integer {key:?}")))
    };
    let float = |key: &str| v.get(key).and_then(Value::as_f64);
    if let Some(model_type) = v.get("model_type").and_then(Value::as_str) {
        if model_type != "llama" {
            return Err(bad(format!(
                "model_type is {model_type:?}; only \"llama\" models are supported"
            )));
        }
    }
    if v.get("tie_word_embeddings").and_then(Value::as_bool) == Some(false) {
        return Err(bad(
            "tie_word_embeddings is false; SmolLM2 models tie the output head to the embeddings"
                .into(),
        ));
    }
    for key in ["attention_bias", "mlp_bias"] {
        if v.get(key).and_then(Value::as_bool) == Some(true) {
            return Err(bad(format!("{key} is true; our Llama block has no biases")));
        }
    }
    if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
        if act != "silu" {
            return Err(bad(format!(
                "hidden_act is {act:?}; only \"silu\" (SwiGLU) is supported"
            )));
        }
    }
    let rope = v
        .get("rope_parameters")
        .or_else(|| v.get("rope_scaling"))
        .filter(|r| !r.is_null());
    if let Some(kind) = rope
        .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
        .and_then(Value::as_str)
    {
        if kind != "default" {
            return Err(bad(format!(
                "rope type {kind:?} is not supported; only the default RoPE is"
            )));
        }
    }
    let rope_theta = float("rope_theta")
        .or_else(|| {
            rope.and_then(|r| r.get("rope_theta"))
                .and_then(Value::as_f64)
        })
        .unwrap_or(10_000.0);
    let hidden_size = int("hidden_size")?;
    let num_attention_heads = int("num_attention_heads")?;
    let token_id = |key: &str| match v.get(key) {
        Some(Value::Array(a)) => a.first().and_then(Value::as_i64),
        Some(x) => x.as_i64(),
        None => None,
    };
    let config = ModelConfig {
        vocab_size: int("vocab_size")?,
        hidden_size,
        intermediate_size: int("intermediate_size")?,
        num_hidden_layers: int("num_hidden_layers")?,
        num_attention_heads,
        num_key_value_heads: int("num_key_value_heads").unwrap_or(num_attention_heads),
        head_dim: int("head_dim").unwrap_or(hidden_size / num_attention_heads.max(1)),
        rope_theta,
        rms_norm_eps: float("rms_norm_eps").unwrap_or(1e-6),
        max_position_embeddings: int("max_position_embeddings").unwrap_or(2048),
        init_std: float("initializer_range").unwrap_or(0.02),
        bos_token_id: token_id("bos_token_id").unwrap_or(0),
        eos_token_id: token_id("eos_token_id").unwrap_or(0),
    };
    config.validate().map_err(|e| bad(e.to_string()))?;
    Ok(config)
}

/// Writes `dir/config.json` and `dir/model.safetensors` (tied head omitted, as transformers does).
pub fn save(vs: &VarStore, config: &ModelConfig, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).at(dir)?;
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let kind = vars.values().next().map_or(Kind::Float, Tensor::kind);
    let named: Vec<(String, Tensor)> = vars.into_iter().map(|(n, t)| (n, t.detach())).collect();
    write_safetensors(&dir.join(checkpoint::MODEL), &named)?;
    let cfg = serde_json::to_string_pretty(&config_json(config, kind)).expect("json");
    let cfg_path = dir.join(checkpoint::CONFIG);
    std::fs::write(&cfg_path, cfg).at(&cfg_path)
}

/// Copies the weights of a transformers model folder into `vs`, whose variables must be exactly
/// the model's: every one present with the right shape (an extra `lm_head.weight` is accepted only
/// if it equals the tied embedding). Nothing is copied unless every tensor fits.
pub fn load(vs: &mut VarStore, dir: &Path) -> Result<()> {
    let mut tensors = read_weights(dir)?;
    tensors.retain(|name, _| !name.ends_with("rotary_emb.inv_freq"));
    if let Some(head) = tensors.remove("lm_head.weight") {
        let same = tensors
            .get("model.embed_tokens.weight")
            .is_some_and(|embed| {
                head.size() == embed.size()
                    && head.to_kind(Kind::Float).equal(&embed.to_kind(Kind::Float))
            });
        if !same {
            return Err(Error::checkpoint(
                dir,
                "lm_head.weight differs from model.embed_tokens.weight; untied heads are not supported",
            ));
        }
    }
    let vars = vs.variables();
    let pairs = match_tensors(
        dir,
        "parameter",
        vars.iter().map(|(n, t)| (n.clone(), t)),
        tensors,
        "is this a Llama model of the same shape?",
    )?;
    tch::no_grad(|| -> Result<()> {
        for (dst, src) in pairs {
            dst.shallow_clone().f_copy_(&src)?;
        }
        Ok(())
    })
}

/// Reads `model.safetensors`, or every file named in `model.safetensors.index.json`.
fn read_weights(dir: &Path) -> Result<BTreeMap<String, Tensor>> {
    let single = dir.join(checkpoint::MODEL);
    let index = dir.join("model.safetensors.index.json");
    let files = if single.exists() {
        vec![single]
    } else if index.exists() {
        let text = std::fs::read_to_string(&index).at(&index)?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| Error::checkpoint(&index, e.to_string()))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::checkpoint(&index, "no \"weight_map\" object"))?;
        let mut files: Vec<_> = map
            .values()
            .filter_map(Value::as_str)
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        files
    } else {
        return Err(Error::checkpoint(
            dir,
            "no model.safetensors or model.safetensors.index.json",
        ));
    };
    let mut out = BTreeMap::new();
    for f in files {
        let file = std::fs::File::open(&f).at(&f)?;
        // SAFETY: read-only; a model folder changed while it is being loaded is a user error
        // that can at worst give wrong weights (the header is checked before any tensor is read).
        let bytes = unsafe { memmap2::Mmap::map(&file) }.at(&f)?;
        out.extend(read_safetensors(&f, &bytes)?);
    }
    Ok(out)
}

/// The libtorch kind of a safetensors dtype.
fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::Bool => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::F8E5M2 => Kind::Float8e5m2,
        Dtype::F8E4M3 => Kind::Float8e4m3fn,
        Dtype::I16 => Kind::Int16,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I32 => Kind::Int,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::U16 | Dtype::U32 | Dtype::U64 => return None,
    })
}

/// The safetensors dtype of a libtorch kind.
fn dtype_of(kind: Kind) -> Option<Dtype> {
    [
        Dtype::Bool,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8E5M2,
        Dtype::F8E4M3,
        Dtype::I16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::F32,
        Dtype::F64,
        Dtype::I64,
    ]
    .into_iter()
    .find(|&d| kind_of(d) == Some(kind))
}

/// The tensors of the safetensors file `path` whose bytes are `data`, in their stored types;
/// the header is checked first (see [`Header::parse`]).
pub fn read_safetensors(path: &Path, data: &[u8]) -> Result<BTreeMap<String, Tensor>> {
    let header = Header::parse(data, data.len() as u64)
        .map_err(|e| Error::checkpoint(path, format!("not a safetensors file: {e}")))?;
    let start = header.data_start() as usize;
    let mut out = BTreeMap::new();
    for (name, info) in header.tensors {
        let kind = kind_of(info.dtype).ok_or_else(|| {
            Error::checkpoint(
                path,
                format!("{name} is {}, which libtorch has no type for", info.dtype),
            )
        })?;
        let (begin, end) = info.data_offsets;
        let bytes = &data[start + begin as usize..start + end as usize];
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        out.insert(name, Tensor::f_from_data_size(bytes, &shape, kind)?);
    }
    Ok(out)
}

/// Writes tensors as safetensors (`{"format": "pt"}` metadata, stored in the order given),
/// streaming each tensor's memory into `w` without another copy. Every tensor must be a
/// contiguous CPU tensor of a type safetensors has.
pub fn write_safetensors_to(w: &mut impl Write, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut entries = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let dtype = dtype_of(t.kind()).ok_or_else(|| {
            Error::Config(format!(
                "{name}: safetensors has no type for {:?}",
                t.kind()
            ))
        })?;
        if t.device() != tch::Device::Cpu || !t.is_contiguous() {
            return Err(Error::Config(format!(
                "{name} is not a contiguous CPU tensor; it cannot be written as it is"
            )));
        }
        let shape: Vec<u64> = t.size().iter().map(|&d| d as u64).collect();
        entries.push((name.as_str(), dtype, shape));
    }
    let metadata = BTreeMap::from([("format".to_owned(), "pt".to_owned())]);
    let header = Header::encode(
        &metadata,
        entries.iter().map(|(n, d, s)| (*n, *d, s.as_slice())),
    );
    let io = |e: std::io::Error| Error::Io {
        path: "safetensors output".into(),
        source: e,
    };
    w.write_all(&header).map_err(io)?;
    for (t, (_, dtype, _)) in tensors.iter().map(|(_, t)| t).zip(&entries) {
        let n = t.numel() * dtype.size() as usize;
        if n == 0 {
            continue;
        }
        // SAFETY: checked above to be a contiguous CPU tensor of this dtype, so its data pointer
        // is valid for numel * element size bytes. Callers hold tensors nothing writes to while
        // this runs (a checkpoint's copies are its own; a live tensor is written before the
        // thread that updates it goes on).
        let bytes = unsafe { std::slice::from_raw_parts(t.data_ptr().cast::<u8>(), n) };
        w.write_all(bytes).map_err(io)?;
    }
    Ok(())
}

/// Writes tensors (on any device, contiguous or not) as the safetensors file `path`.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.f_to_device(tch::Device::Cpu)?.f_contiguous()?)))
        .collect::<Result<_>>()?;
    let file = std::fs::File::create(path).at(path)?;
    let mut w = std::io::BufWriter::new(file);
    write_safetensors_to(&mut w, &cpu).map_err(|e| match e {
        Error::Io { source, .. } => Error::Io {
            path: path.into(),
            source,
        },
        e => e,
    })?;
    w.flush().at(path)
}

/// Pairs each expected tensor (`what`: "parameter", "moment") with the one of that name read
/// from `path`, refusing missing, extra or reshaped ones; `hint` ends each refusal.
pub fn match_tensors<'a>(
    path: &Path,
    what: &str,
    expected: impl IntoIterator<Item = (String, &'a Tensor)>,
    mut found: BTreeMap<String, Tensor>,
    hint: &str,
) -> Result<Vec<(&'a Tensor, Tensor)>> {
    let expected: Vec<(String, &Tensor)> = expected.into_iter().collect();
    let missing: Vec<&str> = expected
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !found.contains_key(*n))
        .collect();
    if let Some(first) = missing.first() {
        let more = match missing.len() {
            1 => String::new(),
            n => format!(" (and {} more missing)", n - 1),
        };
        return Err(Error::checkpoint(
            path,
            format!("no {what} {first}{more}; {hint}"),
        ));
    }
    let mut pairs = Vec::with_capacity(expected.len());
    for (name, dst) in expected {
        let src = found.remove(&name).expect("checked above");
        if src.size() != dst.size() {
            return Err(Error::checkpoint(
                path,
                format!(
                    "{name} has shape {:?} but this model's is {:?}; {hint}",
                    src.size(),
                    dst.size()
                ),
            ));
        }
        pairs.push((dst, src));
    }
    if let Some(extra) = found.keys().next() {
        return Err(Error::checkpoint(
            path,
            format!(
                "{extra} is not part of this model ({} unexpected tensors); {hint}",
                found.len()
            ),
        ));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Llama;

    #[test]
    fn save_load_round_trip_and_shape_errors() {
        let dir = tempfile::tempdir().unwrap();
        tch::manual_seed(1);
        let vs = VarStore::new(tch::Device::Cpu);
        let cfg = ModelConfig::preset("micro").unwrap();
        let m = Llama::new(&vs, cfg.clone()).unwrap();
        save(&vs, &cfg, dir.path()).unwrap();
        assert_eq!(read_config(&dir.path().join("config.json")).unwrap(), cfg);

        tch::manual_seed(2);
        let mut vs2 = VarStore::new(tch::Device::Cpu);
        let m2 = Llama::new(&vs2, cfg.clone()).unwrap();
        load(&mut vs2, dir.path()).unwrap();
        let ids = Tensor::from_slice(&[3i64, 1, 4, 1, 5]).view([1, 5]);
        assert!(m.forward(&ids).unwrap().equal(&m2.forward(&ids).unwrap()));

        // A model of another shape is refused with the parameter named.
        let mut other = cfg.clone();
        other.intermediate_size += 8;
        let mut vs3 = VarStore::new(tch::Device::Cpu);
        let _m3 = Llama::new(&vs3, other).unwrap();
        let err = load(&mut vs3, dir.path()).unwrap_err().to_string();
        assert!(err.contains("mlp") && err.contains("shape"), "{err}");
    }

    /// The tensors stagecoach-core's layout derives from our config.json (what `stagecoach
    /// export` checks) are our model's parameters, names and shapes; a folder `save` writes
    /// passes that check.
    #[test]
    fn the_core_layout_of_our_config_is_our_models_parameters() {
        for preset in ["micro", "tiny", "smollm2-135m"] {
            let cfg = ModelConfig::preset(preset).unwrap();
            let vs = VarStore::new(tch::Device::Cpu);
            let _m = Llama::new(&vs, cfg.clone()).unwrap();
            let layout =
                checkpoint::LlamaLayout::of_config(&config_json(&cfg, Kind::Float)).unwrap();
            let ours: BTreeMap<String, Vec<u64>> = vs
                .variables()
                .into_iter()
                .map(|(n, t)| (n, t.size().iter().map(|&d| d as u64).collect()))
                .collect();
            let theirs: BTreeMap<String, Vec<u64>> = layout.tensors.into_iter().collect();
            assert_eq!(ours, theirs, "{preset}");
            assert_eq!(layout.dtype, Some(Dtype::F32));
            if preset == "micro" {
                let dir = tempfile::tempdir().unwrap();
                save(&vs, &cfg, dir.path()).unwrap();
                let bytes = std::fs::read(dir.path().join(checkpoint::MODEL)).unwrap();
                let header = Header::parse(&bytes, bytes.len() as u64).unwrap();
                let config: Value = serde_json::from_str(
                    &std::fs::read_to_string(dir.path().join(checkpoint::CONFIG)).unwrap(),
                )
                .unwrap();
                let layout = checkpoint::LlamaLayout::of_config(&config).unwrap();
                assert_eq!(layout.mismatches(&header), []);
            }
        }
    }

    /// Safetensors files round-trip every type we write, and a broken header is an error that
    /// names the file.
    #[test]
    fn safetensors_round_trip_and_broken_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let tensors: Vec<(String, Tensor)> = vec![
            (
                "ids".into(),
                Tensor::from_slice(&[3i64, 1, 4, 1, 5, 9]).view([2, 3]),
            ),
            (
                "w".into(),
                Tensor::from_slice(&[0.5f32, -2.0]).to_kind(Kind::BFloat16),
            ),
            // Not contiguous: written as its values.
            (
                "t".into(),
                Tensor::from_slice(&[1f32, 2., 3., 4.]).view([2, 2]).tr(),
            ),
            (
                "empty".into(),
                Tensor::zeros([0, 4], (Kind::Float, tch::Device::Cpu)),
            ),
        ];
        write_safetensors(&path, &tensors).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let back = read_safetensors(&path, &bytes).unwrap();
        assert_eq!(back.len(), tensors.len());
        for (name, t) in &tensors {
            assert_eq!(back[name].kind(), t.kind(), "{name}");
            assert!(back[name].equal(t), "{name}");
        }
        // tch's reader agrees.
        let theirs: BTreeMap<String, Tensor> = Tensor::read_safetensors(&path)
            .unwrap()
            .into_iter()
            .collect();
        assert!(theirs["t"].equal(&tensors[2].1));
        let err = read_safetensors(&path, &bytes[..bytes.len() - 2])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("t.safetensors: not a safetensors file: the tensors' data ends at"),
            "{err}"
        );
    }

    #[test]
    fn unsupported_configs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let mut v = config_json(&ModelConfig::preset("micro").unwrap(), Kind::Float);
        v["tie_word_embeddings"] = json!(false);
        std::fs::write(&path, v.to_string()).unwrap();
        assert!(read_config(&path)
            .unwrap_err()
            .to_string()
            .contains("tie_word_embeddings"));
        std::fs::write(&path, "{not json").unwrap();
        assert!(read_config(&path)
            .unwrap_err()
            .to_string()
            .contains("not valid JSON"));
    }
}
