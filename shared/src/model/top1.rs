//! The network's answer: the first maximum of the logits and its softmax
//! confidence, the same on the host (`host-trainer classify`) and on the
//! board. Display only: the float softmax here never feeds back into the
//! network, and no kernel uses floats.

/// Index of the first maximum of `v` (0 for an empty slice).
pub fn argmax<T: PartialOrd>(v: &[T]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// The first maximum of the int8 `logits` and its softmax probability in
/// per-mille (truncated). `scale` is the logits' quantization scale
/// ([`TensorInfo::scale`](super::TensorInfo::scale) of the output); their
/// zero point is not needed, as softmax depends only on the differences
/// `(v - top) * scale`. `exp` is `micromath`'s (within about 0.1%), so the
/// per-mille figure can be 1 off the exact one.
pub fn top1(logits: &[i8], scale: f32) -> (usize, u16) {
    let best = argmax(logits);
    let Some(&top) = logits.get(best) else {
        return (0, 0);
    };
    let sum: f32 = logits
        .iter()
        .map(|&v| micromath::F32Ext::exp((v as i32 - top as i32) as f32 * scale))
        .sum();
    let p = if sum > 0.0 { 1000.0 / sum } else { 0.0 };
    (best, p as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_maximum() {
        assert_eq!(argmax(&[1, 3, 3, 2]), 1);
        assert_eq!(argmax(&[-1.0f32, -0.5, -2.0]), 1);
        assert_eq!(argmax::<i8>(&[]), 0);
    }

    #[test]
    fn top1_and_confidence() {
        // Equal logits: first index wins, 1/10 each.
        let (c, p) = top1(&[5; 10], 0.1);
        assert_eq!(c, 0);
        assert!((99..=101).contains(&p), "{p}");
        // One logit far ahead: confidence near 1000.
        let mut l = [-100i8; 10];
        l[7] = 100;
        let (c, p) = top1(&l, 0.1);
        assert_eq!(c, 7);
        assert!(p >= 999, "{p}");
        // Two classes a step apart: e^0.5 / (1 + e^0.5) = 622.5‰.
        let (c, p) = top1(&[0, 5], 0.1);
        assert_eq!(c, 1);
        assert!((621..=623).contains(&p), "{p}");
        assert_eq!(top1(&[], 0.1), (0, 0));
    }
}
