//! `Trainer::reinitialize` of a job initialised from its seed gives the parameters of a fresh
//! `Trainer::new` bit for bit. Alone in this test binary: the initialisation draws from
//! libtorch's global generator, which tests running beside it in one process would also draw
//! from.

use stagecoach_proto::v1;
use stagecoach_worker::collective::Solo;
use stagecoach_worker::shards::{ShardWriter, TokenSize};
use stagecoach_worker::train::{Guard, Shape, Trainer};
use tch::{Device, Tensor};

fn parameters(t: &Trainer) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = t
        .var_store()
        .variables()
        .into_iter()
        .map(|(n, p)| (n, p.detach().copy()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn same(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((na, ta), (nb, tb))| na == nb && ta.equal(tb))
}

#[test]
fn a_seeded_job_reinitializes_to_its_fresh_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("a");
    std::fs::create_dir_all(&data).unwrap();
    let mut w = ShardWriter::create(&data.join("00.ds"), TokenSize::U16, "bytes").unwrap();
    let doc: Vec<u32> = (0..400u32).map(|i| (i * 7919) % 256).collect();
    w.write_document(&doc).unwrap();
    w.finish().unwrap();
    let spec = v1::JobSpec {
        name: "reinit".into(),
        model_preset: "micro".into(),
        rope_theta: 10_000.0,
        optimizer: Some(v1::OptimizerSpec {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.01,
            grad_clip: 1.0,
        }),
        seq_len: 32,
        sources: vec![v1::SourceSpec {
            name: "a".into(),
            path: data.display().to_string(),
            eval_path: String::new(),
        }],
        threads: 1,
        init_seed: 42,
        ..Default::default()
    };
    let mut t = Trainer::new(&spec, Device::Cpu).unwrap();
    let initial = parameters(&t);
    let shape = Shape::new(32, 2).unwrap();
    for i in 0..3u64 {
        let samples = [(0, i * 64), (0, i * 64 + 32)];
        t.step(&samples, shape, 2, 1e-2, Guard::default(), &mut Solo)
            .unwrap();
    }
    t.set_rope_theta(40_000.0).unwrap();
    assert!(!same(&initial, &parameters(&t)));
    // Something else draws from the generator meanwhile: the seed is set again.
    let _ = Tensor::randn([16], (tch::Kind::Float, Device::Cpu));

    t.reinitialize().unwrap();
    assert!(
        same(&initial, &parameters(&t)),
        "not the initial parameters"
    );
    let fresh = Trainer::new(&spec, Device::Cpu).unwrap();
    assert!(same(&parameters(&fresh), &parameters(&t)));
    assert_eq!(t.optimizer().step_count(), 0);
    assert_eq!(t.rope_theta(), 10_000.0);
    for p in t.optimizer().params() {
        assert_eq!(p.exp_avg.abs().sum(tch::Kind::Float).double_value(&[]), 0.0);
        assert_eq!(
            p.exp_avg_sq.abs().sum(tch::Kind::Float).double_value(&[]),
            0.0
        );
    }
}
