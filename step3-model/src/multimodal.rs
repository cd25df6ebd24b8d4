//! The whole Step3: the language model plus, for `step3_vl` checkpoints, the vision tower whose
//! image features replace the embeddings of the `<im_patch>` placeholders.

use std::path::Path;

use candle_core::Tensor;
use step3_vision::{ImageLayout, ImageTokenIds, PreprocessConfig, PreprocessedImage, VisionModel};

use crate::text::Step3TextModel;
use crate::{Error, Result};

/// Step3 with its eyes: the language model, the vision tower and the preprocessing settings that
/// go with it. For a text-only checkpoint `vision` is `None`.
#[derive(Debug, Clone)]
pub struct Step3Model {
    pub text: Step3TextModel,
    pub vision: Option<VisionModel>,
    /// The `<im_patch>` id (`image_token_id`).
    pub image_token_id: Option<u32>,
    pub preprocess: PreprocessConfig,
}

impl Step3Model {
    fn vision(&self) -> Result<(&VisionModel, u32)> {
        match (&self.vision, self.image_token_id) {
            (Some(v), Some(id)) => Ok((v, id)),
            (None, _) => Err(Error::Input("this checkpoint has no vision tower (model_type step3_text)".into())),
            (Some(_), None) => {
                Err(Error::Input("config.json has no image_token_id: images cannot be placed in a prompt".into()))
            }
        }
    }

    /// Decodes and preprocesses an image (a file or encoded bytes) with this model's settings.
    pub fn image(&self, source: &crate::chat::ImageSource) -> Result<PreprocessedImage> {
        match source {
            crate::chat::ImageSource::File(path) => self.load_image(path),
            crate::chat::ImageSource::Bytes(bytes) => {
                let img = step3_vision::decode_image(bytes, self.preprocess.max_pixels)?;
                Ok(step3_vision::preprocess(&img, &self.preprocess)?)
            }
        }
    }

    /// Reads and preprocesses an image file with this model's settings.
    pub fn load_image(&self, path: &Path) -> Result<PreprocessedImage> {
        let img = step3_vision::load_image(path, self.preprocess.max_pixels)?;
        step3_vision::preprocess(&img, &self.preprocess)
            .map_err(|error| Error::ImageFile { path: path.to_path_buf(), error })
    }

    /// The token layout of a preprocessed image (features per crop and per global view follow
    /// from the vision tower and the preprocessing sizes).
    pub fn layout(&self, image: &PreprocessedImage) -> Result<ImageLayout> {
        let (vision, _) = self.vision()?;
        let cfg = vision.config();
        Ok(ImageLayout {
            newline_mask: image.newline_mask.clone(),
            crop_tokens: cfg.tokens_per_view(self.preprocess.crop_size),
            global_tokens: cfg.tokens_per_view(self.preprocess.image_size),
        })
    }

    /// Image features of `images`, `[N, hidden]`: per image, its crops in tiling order, then its
    /// global view.
    pub fn encode_images(&self, images: &[PreprocessedImage]) -> Result<Tensor> {
        let (vision, _) = self.vision()?;
        let device = self.text.device();
        let hidden = self.text.config().hidden_size;
        let mut parts = Vec::new();
        for img in images {
            if let Some(crops) = &img.patch_pixel_values {
                let f = vision.forward(&crops.to_device(device)?)?; // [n, t, H]
                parts.push(f.reshape(((), hidden))?);
            }
            let g = vision.forward(&img.pixel_values.to_device(device)?)?;
            parts.push(g.reshape(((), hidden))?);
        }
        if parts.is_empty() {
            return Ok(Tensor::zeros((0, hidden), self.text.dtype(), device)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Replaces each single `<im_patch>` of `ids` (one per image, in order) with the image's full
    /// layout. Ids that already hold the expanded layouts are returned unchanged; any other count
    /// of placeholders is an error.
    pub fn expand_placeholders(
        &self,
        ids: &[u32],
        images: &[PreprocessedImage],
        tokens: &ImageTokenIds,
    ) -> Result<Vec<u32>> {
        let (_, patch) = self.vision()?;
        let found = ids.iter().filter(|&&t| t == patch).count();
        let layouts = images.iter().map(|i| self.layout(i)).collect::<Result<Vec<_>>>()?;
        let expanded: usize = layouts.iter().map(ImageLayout::num_features).sum();
        if found == expanded {
            return Ok(ids.to_vec());
        }
        if found != images.len() {
            return Err(Error::Input(format!(
                "the prompt has {found} <im_patch> placeholders for {} image(s): put one per image (expanded by the library) or the full layouts ({expanded})",
                images.len()
            )));
        }
        let mut layouts = layouts.iter();
        let mut out = Vec::with_capacity(ids.len() + expanded);
        for &t in ids {
            match (t == patch).then(|| layouts.next()).flatten() {
                Some(l) => out.extend(l.token_ids(tokens)),
                None => out.push(t),
            }
        }
        Ok(out)
    }

    /// Embeddings of a prompt `[1, T, H]`: token embeddings, with the rows at `<im_patch>`
    /// positions replaced in order by the features of `images`.
    pub fn embed(&self, ids: &[u32], images: &[PreprocessedImage]) -> Result<Tensor> {
        self.text.check_ids(ids)?;
        let device = self.text.device();
        let text = self.text.embed(&Tensor::new(ids, device)?.unsqueeze(0)?)?;
        if images.is_empty() {
            return Ok(text);
        }
        let (_, patch) = self.vision()?;
        let features = self.encode_images(images)?;
        merge(&text, ids, patch, &features)
    }
}

/// `text [1, T, H]` with the rows at `placeholder` positions replaced, in order, by `features [N, H]`.
pub fn merge(text: &Tensor, ids: &[u32], placeholder: u32, features: &Tensor) -> Result<Tensor> {
    let positions: Vec<u32> =
        ids.iter().enumerate().filter(|(_, &t)| t == placeholder).map(|(i, _)| i as u32).collect();
    let n = features.dim(0)?;
    if positions.len() != n {
        return Err(Error::Input(format!(
            "the prompt has {} <im_patch> placeholders but the images give {n} features",
            positions.len()
        )));
    }
    let device = text.device();
    let hidden = text.dim(2)?;
    // Row i takes feature k when it is the k-th placeholder, else its own text embedding.
    let mut source = vec![0u32; ids.len()];
    let mut is_image = vec![0u8; ids.len()];
    for (k, &p) in positions.iter().enumerate() {
        source[p as usize] = k as u32;
        is_image[p as usize] = 1;
    }
    let gathered = features.to_dtype(text.dtype())?.index_select(&Tensor::new(source, device)?, 0)?;
    let mask = Tensor::new(is_image, device)?.unsqueeze(1)?.broadcast_as((ids.len(), hidden))?;
    let merged = mask.where_cond(&gathered, &text.squeeze(0)?)?;
    Ok(merged.unsqueeze(0)?)
}
