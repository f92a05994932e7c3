//! The served networks as plain f32 safetensors under burn's parameter names, so an
//! outside runtime can run exactly the weights Marquee runs: the towers after
//! widening from f16 (and int8 for the word table), and each fusion member. The peer
//! benchmark (benches/peer/) builds its ONNX graphs from these files.

use super::towers::Towers;
use crate::nn::fusion::EarlyFusion;
use anyhow::{Result, anyhow};
use burn::store::{ModuleSnapshot, SafetensorsStore};
use std::path::{Path, PathBuf};

fn write<M: ModuleSnapshot>(m: &M, path: PathBuf) -> Result<PathBuf> {
    // Only what the model serves: not the image tower's ImageNet classifier, which
    // the bundle leaves out (and which is re-initialised at random on every load).
    // No metadata: burn's sits in a hash map, written in a different order each run,
    // and the peer benchmark keys its graphs on these files' bytes.
    let mut store = SafetensorsStore::from_file(&path)
        .overwrite(true)
        .clear_metadata()
        .with_predicate(|p, _| !p.starts_with("fc."));
    m.save_into(&mut store)
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(path)
}

/// Writes `image_tower`, `text_tower` and `fusion_<i>` `.safetensors` into `dir`.
pub fn write_f32(towers: &Towers, members: &[EarlyFusion], dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow!("{}: {e}", dir.display()))?;
    let mut out = vec![
        write(&towers.image, dir.join("image_tower.safetensors"))?,
        write(&towers.text, dir.join("text_tower.safetensors"))?,
    ];
    for (i, m) in members.iter().enumerate() {
        out.push(write(m, dir.join(format!("fusion_{i}.safetensors")))?);
    }
    Ok(out)
}
