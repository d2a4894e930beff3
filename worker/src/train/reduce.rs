//! What a step exchanges with the other ranks: gradients (and, at step 0, parameters) in
//! buckets, and the numbers every rank must agree on exactly (the global loss and the gradient
//! norm the guard and the clipping decide from).

use tch::Tensor;

use crate::collective::Collective;
use crate::error::{Error, Result};

/// Gradients are all-reduced in buckets of about this many bytes.
const BUCKET_BYTES: usize = 25 << 20;

/// What every rank of a step knows alike after [`agree`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Agreed {
    pub(super) global_loss: f64,
    pub(super) grad_norm: f64,
}

/// Each rank's report travels as 16-bit pieces of its bits, in its own slots of a buffer that
/// is zero elsewhere: whole numbers below 2^16 plus zeros sum exactly in f32 whatever the order
/// or the backend, so every rank decodes every rank's exact f64s.
const REPORT_SLOTS: usize = 12;

fn encode_u64(v: u64, out: &mut [f32]) {
    for (i, slot) in out.iter_mut().take(4).enumerate() {
        *slot = ((v >> (16 * i)) & 0xffff) as f32;
    }
}

fn decode_u64(slots: &[f32]) -> u64 {
    slots
        .iter()
        .take(4)
        .enumerate()
        .fold(0, |v, (i, &s)| v | ((s as u64) << (16 * i)))
}

/// Shares this rank's loss sum, sample count and local gradient norm with every rank: the global
/// mean loss is the sum over ranks (in rank order) over the global sample count, and the gradient
/// norm is rank 0's (ranks hold the same all-reduced gradients; taking one rank's norm makes the
/// guard's and the clipping's decisions identical even if a norm differed in its last bit).
pub(super) fn agree(
    comm: &mut dyn Collective,
    loss_sum: f64,
    samples: usize,
    grad_norm: f64,
) -> Result<Agreed> {
    let n = comm.world_size();
    if n == 1 {
        return Ok(Agreed {
            global_loss: loss_sum / samples.max(1) as f64,
            grad_norm,
        });
    }
    let mut buf = vec![0f32; n * REPORT_SLOTS];
    let mine = &mut buf[comm.rank() * REPORT_SLOTS..][..REPORT_SLOTS];
    encode_u64(loss_sum.to_bits(), &mut mine[0..4]);
    encode_u64(samples as u64, &mut mine[4..8]);
    encode_u64(grad_norm.to_bits(), &mut mine[8..12]);
    comm.all_reduce_sum(&mut buf)
        .map_err(|e| Error::Collective(e.to_string()))?;
    let (mut total_loss, mut total_samples) = (0.0, 0u64);
    for r in buf.chunks_exact(REPORT_SLOTS) {
        total_loss += f64::from_bits(decode_u64(&r[0..4]));
        total_samples += decode_u64(&r[4..8]);
    }
    Ok(Agreed {
        global_loss: total_loss / total_samples.max(1) as f64,
        grad_norm: f64::from_bits(decode_u64(&buf[8..12])),
    })
}

/// Calls `f` on consecutive groups of tensors of about [`BUCKET_BYTES`].
pub(super) fn for_each_bucket(
    tensors: &[Tensor],
    mut f: impl FnMut(&[Tensor]) -> Result<()>,
) -> Result<()> {
    let mut start = 0;
    let mut bytes = 0;
    for (i, t) in tensors.iter().enumerate() {
        bytes += t.numel() * 4;
        if bytes >= BUCKET_BYTES || i + 1 == tensors.len() {
            f(&tensors[start..=i])?;
            start = i + 1;
            bytes = 0;
        }
    }
    Ok(())
}

pub(super) fn flatten(group: &[Tensor], f: impl Fn(&Tensor) -> Tensor) -> Tensor {
    let parts: Vec<Tensor> = group.iter().map(|t| f(t).reshape([-1])).collect();
    Tensor::cat(&parts, 0)
}

/// All-reduces `flat` and copies the result back into `group`.
pub(super) fn all_reduce(
    comm: &mut dyn Collective,
    mut flat: Tensor,
    group: &[Tensor],
) -> Result<()> {
    comm.all_reduce_tensor(&mut flat)
        .map_err(|e| Error::Collective(e.to_string()))?;
    let mut offset = 0;
    for t in group {
        let n = t.numel() as i64;
        let mut dst = t.shallow_clone();
        dst.f_copy_(&flat.narrow(0, offset, n).view(t.size().as_slice()))?;
        offset += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_travel_exactly_through_f32_sums() {
        for v in [
            0u64,
            1,
            0xffff,
            0x1_0000,
            u64::MAX,
            f64::NAN.to_bits(),
            2.75f64.to_bits(),
        ] {
            let mut slots = [0f32; 4];
            encode_u64(v, &mut slots);
            // What another rank's zeros add.
            let summed: Vec<f32> = slots.iter().map(|s| s + 0.0 + 0.0).collect();
            assert_eq!(decode_u64(&summed), v);
        }
    }
}
