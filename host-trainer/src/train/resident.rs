//! Batches from a data set kept on the compute device (the GPU path).
//!
//! [`crate::augment::batch`] builds every batch on the host and uploads it:
//! cheap next to a CPU training step, but on a GPU it would put a host-side
//! image loop and a 1.5 MB upload into every step. [`Resident`] uploads the
//! whole set once, as `u8` images already padded by [`CROP_PAD`] with the
//! value 128 (which normalizes to 0.0, the same as the host path's padding).
//! A batch is then one gather on the device: the host sends only
//! `2 * 32` offsets per image (the crop rows and the possibly mirrored
//! crop columns, 256 bytes), the device adds them into a full pixel index,
//! gathers, converts to `f32` and normalizes.
//!
//! The result equals [`crate::augment::batch`] bit for bit (the
//! normalization `p / 128 - 1` is exact in `f32`); the tests check this on
//! the CPU device, where the same candle ops run.

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};

use crate::augment::{Aug, CROP_PAD};
use crate::data::{Dataset, IMAGE_BYTES};

/// Side of the square images.
const SIZE: usize = 32;
/// Side of a padded image.
const PADDED: usize = SIZE + 2 * CROP_PAD;
/// Bytes of one padded HWC image.
const PADDED_BYTES: usize = PADDED * PADDED * 3;

/// A data set resident on a device.
#[derive(Debug)]
pub struct Resident {
    /// All images, padded, HWC, flattened: `(len * PADDED_BYTES,)` u8.
    pixels: Tensor,
    /// Labels `(len,)` u32.
    labels: Tensor,
    /// Channel offsets `0, 1, 2`, shape `(1, 1, 1, 3)` u32.
    channel: Tensor,
    len: usize,
}

impl Resident {
    /// Pads and uploads `ds` to `device`.
    pub fn upload(ds: &Dataset, device: &Device) -> Result<Self> {
        ensure!(
            ds.len().saturating_mul(PADDED_BYTES) < u32::MAX as usize,
            "{} images do not fit a device-resident set (at most {})",
            ds.len(),
            u32::MAX as usize / PADDED_BYTES
        );
        let mut padded = vec![128u8; ds.len() * PADDED_BYTES];
        for (i, dst) in padded.chunks_exact_mut(PADDED_BYTES).enumerate() {
            let src = ds.image(i);
            for y in 0..SIZE {
                let d = ((y + CROP_PAD) * PADDED + CROP_PAD) * 3;
                dst[d..d + SIZE * 3].copy_from_slice(&src[y * SIZE * 3..(y + 1) * SIZE * 3]);
            }
        }
        debug_assert_eq!(IMAGE_BYTES, SIZE * SIZE * 3);
        let labels: Vec<u32> = ds.labels.iter().map(|&l| l as u32).collect();
        Ok(Self {
            pixels: Tensor::from_vec(padded, ds.len() * PADDED_BYTES, device)?,
            labels: Tensor::from_vec(labels, ds.len(), device)?,
            channel: Tensor::from_vec(vec![0u32, 1, 2], (1, 1, 1, 3), device)?,
            len: ds.len(),
        })
    }

    /// The device the set lives on.
    pub fn device(&self) -> Device {
        self.pixels.device().clone()
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The batch of images `indices`, as [`crate::augment::batch`] makes
    /// it: images `(n, 3, 32, 32)` f32 and labels `(n,)` u32, on the
    /// resident set's device.
    pub fn batch(
        &self,
        indices: &[usize],
        augment: Option<(u64, usize)>,
    ) -> Result<(Tensor, Tensor)> {
        let n = indices.len();
        let device = self.pixels.device();
        // Per image: the offset of each crop row, and of each output
        // column's source pixel (mirrored when flipped).
        let mut rows = Vec::with_capacity(n * SIZE);
        let mut cols = Vec::with_capacity(n * SIZE);
        let mut ids = Vec::with_capacity(n);
        for &i in indices {
            ensure!(i < self.len, "image index {i} out of range ({})", self.len);
            let aug = match augment {
                Some((seed, epoch)) => Aug::draw(seed, epoch, i),
                None => Aug::NONE,
            };
            let base = i * PADDED_BYTES;
            rows.extend((0..SIZE).map(|y| (base + (y + aug.dy) * PADDED * 3) as u32));
            cols.extend((0..SIZE).map(|x| {
                let xx = if aug.flip { SIZE - 1 - x } else { x };
                ((xx + aug.dx) * 3) as u32
            }));
            ids.push(i as u32);
        }
        let rows = Tensor::from_vec(rows, (n, SIZE, 1, 1), device)?;
        let cols = Tensor::from_vec(cols, (n, 1, SIZE, 1), device)?;
        let index = rows
            .broadcast_add(&cols)?
            .broadcast_add(&self.channel)?
            .flatten_all()?;
        let x = self
            .pixels
            .index_select(&index, 0)?
            .reshape((n, SIZE, SIZE, 3))?
            .permute((0, 3, 1, 2))?
            .to_dtype(DType::F32)?
            .affine(1.0 / 128.0, -1.0)?
            .contiguous()?;
        let y = self
            .labels
            .index_select(&Tensor::from_vec(ids, n, device)?, 0)?;
        Ok((x, y))
    }
}

/// Where batches come from: built on the host (CPU training, where that is
/// cheapest) or gathered from a device-resident copy (GPU training).
#[derive(Debug)]
pub enum Batches<'a> {
    /// [`crate::augment::batch`] on the host, uploaded to the device.
    Host(&'a Dataset, Device),
    /// [`Resident::batch`] (and the host set, for camera batches).
    Resident(Resident, &'a Dataset),
}

impl<'a> Batches<'a> {
    /// Host batches on the CPU, a resident copy on any other device.
    pub fn new(ds: &'a Dataset, device: &Device) -> Result<Self> {
        Ok(if device.is_cpu() {
            Self::Host(ds, device.clone())
        } else {
            Self::Resident(Resident::upload(ds, device)?, ds)
        })
    }

    /// The batch of images `indices` (see [`crate::augment::batch`]).
    pub fn batch(
        &self,
        indices: &[usize],
        augment: Option<(u64, usize)>,
    ) -> Result<(Tensor, Tensor)> {
        match self {
            Self::Host(ds, device) => crate::augment::batch(ds, indices, augment, device),
            Self::Resident(r, _) => r.batch(indices, augment),
        }
    }

    /// The batch of images `indices` with camera augmentations (see
    /// [`crate::camera_aug`]). Built on the host on every device: the
    /// per-image filters run on the CPU's threads, and a GPU receives the
    /// finished batch.
    pub fn camera_batch(
        &self,
        indices: &[usize],
        aug: &crate::camera_aug::CameraAug,
        seed: u64,
        epoch: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (ds, device) = match self {
            Self::Host(ds, device) => (*ds, device.clone()),
            Self::Resident(r, ds) => (*ds, r.device()),
        };
        crate::camera_aug::batch(ds, indices, aug, seed, epoch, &device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::batch;
    use crate::data::synthetic;

    #[test]
    fn resident_batches_equal_host_batches_bit_for_bit() {
        let ds = synthetic(37, 10, 3);
        let r = Resident::upload(&ds, &Device::Cpu).unwrap();
        assert_eq!(r.len(), 37);
        let idx = [36usize, 0, 5, 5, 17, 2, 33];
        for augment in [None, Some((7u64, 0usize)), Some((7, 1)), Some((9, 4))] {
            let (xh, yh) = batch(&ds, &idx, augment, &Device::Cpu).unwrap();
            let (xr, yr) = r.batch(&idx, augment).unwrap();
            assert_eq!(xr.dims(), xh.dims());
            let (a, b): (Vec<f32>, Vec<f32>) = (
                xh.flatten_all().unwrap().to_vec1().unwrap(),
                xr.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
            assert_eq!(yh.to_vec1::<u32>().unwrap(), yr.to_vec1::<u32>().unwrap());
        }
        // The augmented draws do move pixels (the check above is not
        // comparing two identity crops).
        let (plain, _) = r.batch(&idx, None).unwrap();
        let (aug, _) = r.batch(&idx, Some((7, 0))).unwrap();
        let diff = (plain - aug).unwrap().abs().unwrap().sum_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() > 1.0);
    }

    #[test]
    fn out_of_range_index_is_an_error() {
        let r = Resident::upload(&synthetic(3, 10, 1), &Device::Cpu).unwrap();
        let e = r.batch(&[0, 3], None).unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
    }
}
