//! Interchange with transformers: a model folder holding `config.json` (a `LlamaConfig`) and
//! `model.safetensors` (or shards listed in `model.safetensors.index.json`) with
//! `LlamaForCausalLM` parameter names. Our checkpoints load in transformers and theirs in ours.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::{json, Value};
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
    let named: Vec<(String, Tensor)> = vars
        .into_iter()
        .map(|(name, t)| (name, t.detach().to_device(tch::Device::Cpu).contiguous()))
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &named)?;
    let cfg = serde_json::to_string_pretty(&config_json(config, kind)).expect("json");
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, cfg).at(&cfg_path)
}

/// Copies the weights of a transformers model folder into `vs`, whose variables must be exactly
/// the model's: every one present with the right shape (an extra `lm_head.weight` is accepted only
/// if it equals the tied embedding).
pub fn load(vs: &mut VarStore, dir: &Path) -> Result<()> {
    let tensors = read_weights(dir)?;
    let mut vars = vs.variables();
    let mut missing: Vec<&String> = vars.keys().filter(|k| !tensors.contains_key(*k)).collect();
    missing.sort();
    if let Some(first) = missing.first() {
        return Err(Error::checkpoint(
            dir,
            format!(
                "{} parameters missing, e.g. {first}; is this a Llama model of the same shape?",
                missing.len()
            ),
        ));
    }
    for (name, src) in &tensors {
        if name == "lm_head.weight" {
            let embed = &tensors["model.embed_tokens.weight"];
            let same = src.size() == embed.size()
                && src.to_kind(Kind::Float).equal(&embed.to_kind(Kind::Float));
            if !same {
                return Err(Error::checkpoint(dir, "lm_head.weight differs from model.embed_tokens.weight; untied heads are not supported"));
            }
            continue;
        }
        if name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        let Some(dst) = vars.get_mut(name) else {
            return Err(Error::checkpoint(
                dir,
                format!("unexpected parameter {name}: not part of this model"),
            ));
        };
        if dst.size() != src.size() {
            return Err(Error::checkpoint(
                dir,
                format!(
                    "{name} has shape {:?}, the model expects {:?}",
                    src.size(),
                    dst.size()
                ),
            ));
        }
        tch::no_grad(|| dst.f_copy_(src))?;
    }
    Ok(())
}

/// Reads `model.safetensors`, or every file named in `model.safetensors.index.json`.
fn read_weights(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
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
    let mut out = HashMap::new();
    for f in files {
        let tensors =
            Tensor::read_safetensors(&f).map_err(|e| Error::checkpoint(&f, e.to_string()))?;
        out.extend(tensors);
    }
    Ok(out)
}

struct View<'a> {
    tensor: &'a Tensor,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
}

impl safetensors::View for View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let mut buf = vec![0u8; self.data_len()];
        self.tensor.copy_data_u8(&mut buf, self.tensor.numel());
        buf.into()
    }
    fn data_len(&self) -> usize {
        self.tensor.numel() * self.tensor.kind().elt_size_in_bytes()
    }
}

/// Writes CPU-contiguous tensors as safetensors with `{"format": "pt"}` metadata, as PyTorch
/// users' tools expect.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, t)| {
            let dtype = safetensors::Dtype::try_from(t.kind())?;
            let shape = t.size().iter().map(|&d| d as usize).collect();
            Ok((
                name.as_str(),
                View {
                    tensor: t,
                    dtype,
                    shape,
                },
            ))
        })
        .collect::<Result<Vec<_>, tch::TchError>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, &Some(metadata), path)
        .map_err(|e| Error::checkpoint(path, e.to_string()))
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
