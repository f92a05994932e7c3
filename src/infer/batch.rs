//! The one fusion-input builder. Serving (`Classifier`, and so evaluation) and
//! training (`train::fusion`) both turn rows into a `FusionInput` here, so padding,
//! masks and hidden modalities cannot differ between what a model learns from and
//! what it serves.

use crate::nn::efficientnet::FEATURE_DIM;
use crate::nn::fusion::FusionInput;
use burn::prelude::*;

/// Width of the text tower's hidden states (MiniLM).
pub const TEXT_DIM: usize = 384;

/// One row, as the towers produce it (f32 when serving, f16 from the training cache).
#[derive(Debug, Clone, Copy)]
pub struct FusionRow<'a, T> {
    /// The poster's region tokens, `[cells, FEATURE_DIM]` row-major.
    pub image: &'a [T],
    /// Hide the poster from the model (an image-less ablation, modality dropout).
    pub hide_image: bool,
    /// The text's hidden states, `[len, TEXT_DIM]`; empty when there is no text (or
    /// it is hidden).
    pub text: &'a [T],
}

/// A batch of rows. Text is right-padded to the longest row (at least one slot, so
/// every batch has the same structure); padding and absent text are masked.
pub fn batch<T: Copy + Into<f32>>(
    rows: &[FusionRow<'_, T>],
    cells: usize,
    device: &Device,
) -> FusionInput {
    let n = rows.len();
    let cell_len = cells * FEATURE_DIM;
    let len = rows
        .iter()
        .map(|r| r.text.len() / TEXT_DIM)
        .max()
        .unwrap_or(0)
        .max(1);
    let mut image = Vec::with_capacity(n * cell_len);
    let mut text = vec![0f32; n * len * TEXT_DIM];
    let mut text_mask = vec![true; n * len];
    for (k, r) in rows.iter().enumerate() {
        debug_assert_eq!(r.image.len(), cell_len, "image tokens of row {k}");
        image.extend(r.image.iter().map(|&x| x.into()));
        let l = r.text.len() / TEXT_DIM;
        let row = &mut text[k * len * TEXT_DIM..][..l * TEXT_DIM];
        for (d, &s) in row.iter_mut().zip(r.text) {
            *d = s.into();
        }
        text_mask[k * len..k * len + l].fill(false);
    }
    let hidden: Vec<bool> = rows.iter().map(|r| r.hide_image).collect();
    FusionInput {
        image: Tensor::from_data(TensorData::new(image, [n, cells, FEATURE_DIM]), device),
        image_hidden: Tensor::from_data(TensorData::new(hidden, [n, 1]), device),
        text: Tensor::from_data(TensorData::new(text, [n, len, TEXT_DIM]), device),
        text_mask: Tensor::from_data(TensorData::new(text_mask, [n, len]), device),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_text_to_the_longest_row_and_masks_what_is_absent() {
        let dev = Device::flex();
        let img = vec![0.5f32; 2 * FEATURE_DIM];
        let two = vec![1.0f32; 2 * TEXT_DIM];
        let rows = [
            FusionRow {
                image: &img[..],
                hide_image: false,
                text: &two[..],
            },
            FusionRow {
                image: &img[..],
                hide_image: true,
                text: &[],
            },
        ];
        let b = batch(&rows, 2, &dev);
        assert_eq!(b.image.dims(), [2, 2, FEATURE_DIM]);
        assert_eq!(b.text.dims(), [2, 2, TEXT_DIM]);
        let mask: Vec<bool> = b.text_mask.into_data().try_to_vec().unwrap();
        assert_eq!(mask, [false, false, true, true]);
        let hidden: Vec<bool> = b.image_hidden.into_data().try_to_vec().unwrap();
        assert_eq!(hidden, [false, true]);
        let text: Vec<f32> = b.text.into_data().try_to_vec().unwrap();
        assert!(text[..2 * TEXT_DIM].iter().all(|&x| x == 1.0));
        assert!(text[2 * TEXT_DIM..].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn a_row_without_text_still_has_one_masked_slot() {
        let dev = Device::flex();
        let img = vec![0.0f32; FEATURE_DIM];
        let b = batch(
            &[FusionRow {
                image: &img[..],
                hide_image: false,
                text: &[],
            }],
            1,
            &dev,
        );
        assert_eq!(b.text.dims(), [1, 1, TEXT_DIM]);
        let mask: Vec<bool> = b.text_mask.into_data().try_to_vec().unwrap();
        assert_eq!(mask, [true]);
    }
}
