//! The self-attention hook: with a hook that only observes, the UNet output is bit-identical
//! to the unhooked path; the hook sees every `attn1` layer, told apart structurally; a hook's
//! replacement reaches the output.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, golden, max_abs_diff};
use flipsketch_models::attention::{
    merge_heads, scaled_dot_product_attention, split_heads, AttentionHook, SelfAttnCall,
    SelfAttnKind,
};
use flipsketch_models::loading::{load_component, DIFFUSERS_WEIGHTS};
use flipsketch_models::unets::unet_3d_condition::{UNet3DConditionModel, UNet3DConfig};

fn unet() -> UNet3DConditionModel {
    let dir = fixtures().join("tiny/unet");
    let cfg = UNet3DConfig::from_file(&dir.join("config.json")).unwrap();
    load_component(
        "unet",
        &dir,
        &DIFFUSERS_WEIGHTS.candidates(None),
        DType::F32,
        &Device::Cpu,
        |vb| UNet3DConditionModel::new(&cfg, vb),
    )
    .unwrap()
    .0
}

#[derive(Default)]
struct Recorder {
    /// layer -> (kind, query dims)
    seen: BTreeMap<String, (SelfAttnKind, Vec<usize>)>,
    order: Vec<String>,
    /// Recompute plain attention from the given q/k/v and return it.
    replace_with_plain: bool,
    /// Zero this layer's attention output.
    zero_layer: Option<String>,
}

impl AttentionHook for Recorder {
    fn self_attention(&mut self, call: &SelfAttnCall) -> candle_core::Result<Option<Tensor>> {
        assert_eq!(call.query.dims(), call.key.dims());
        self.seen.insert(
            call.layer.to_string(),
            (call.kind, call.query.dims().to_vec()),
        );
        self.order.push(call.layer.to_string());
        if self.zero_layer.as_deref() == Some(call.layer) {
            return Ok(Some(call.value.zeros_like()?));
        }
        if self.replace_with_plain {
            // Through the split-head entry point, with the heads split and merged back.
            let h = call.heads;
            let (q, k, v) = (
                split_heads(call.query, h)?,
                split_heads(call.key, h)?,
                split_heads(call.value, h)?,
            );
            return Ok(Some(merge_heads(&scaled_dot_product_attention(
                call.path, &q, &k, &v, call.scale,
            )?)?));
        }
        Ok(None)
    }
}

#[test]
fn observing_hook_is_bit_identical_and_sees_every_attn1() {
    let unet = unet();
    let g = golden("unet_a_2.safetensors"); // B=2, F=4, 6x10 latents
    let (sample, ehs) = (&g["sample"], &g["encoder_hidden_states"]);
    let plain = unet.forward(sample, 500.0, ehs, None).unwrap();

    let mut rec = Recorder::default();
    let hooked = unet.forward(sample, 500.0, ehs, Some(&mut rec)).unwrap();
    assert_eq!(
        max_abs_diff(&plain, &hooked),
        0.0,
        "observing hook changed the output"
    );

    // tiny config A: transformer_in + one cross-attention level down (1 layer), mid, and up
    // (2 layers): spatial and temporal attn1 each 1 + 1 + 2 = 4, plus transformer_in.
    let spatial: Vec<_> = rec
        .seen
        .iter()
        .filter(|(_, (k, _))| *k == SelfAttnKind::Spatial)
        .collect();
    let temporal: Vec<_> = rec
        .seen
        .iter()
        .filter(|(_, (k, _))| *k == SelfAttnKind::Temporal)
        .collect();
    assert_eq!(spatial.len(), 4, "{:?}", rec.seen.keys());
    assert_eq!(temporal.len(), 5, "{:?}", rec.seen.keys());
    assert_eq!(rec.order.len(), 9, "each attn1 is called once per forward");
    assert_eq!(rec.order[0], "transformer_in.transformer_blocks.0.attn1");
    for (name, (kind, dims)) in &rec.seen {
        assert!(name.ends_with("attn1"), "{name}");
        let (b, f) = (2, 4);
        match kind {
            // batch = B*F frames, sequence = pixels of the level
            SelfAttnKind::Spatial => {
                assert!(name.contains(".attentions."), "{name}");
                assert_eq!(dims[0], b * f, "{name}");
            }
            // batch = B*pixels, sequence = F
            SelfAttnKind::Temporal => {
                assert!(
                    name.contains("temp_attentions") || name.starts_with("transformer_in"),
                    "{name}"
                );
                assert_eq!(dims[1], f, "{name}");
                assert_eq!(dims[0] % b, 0, "{name}");
            }
        }
    }
    let (_, dims) = &rec.seen["down_blocks.0.attentions.0.transformer_blocks.0.attn1"];
    assert_eq!(
        dims,
        &vec![8, 60, 16],
        "spatial q: (B*F, h*w, heads * head_dim), 2 heads of 8"
    );
    let (_, dims) = &rec.seen["transformer_in.transformer_blocks.0.attn1"];
    assert_eq!(
        dims,
        &vec![2 * 60, 4, 64],
        "transformer_in q: (B*h*w, F, 8 heads * head_dim 8)"
    );
}

#[test]
fn hook_replacement_reaches_the_output() {
    let unet = unet();
    let g = golden("unet_a_0.safetensors");
    let (sample, ehs) = (&g["sample"], &g["encoder_hidden_states"]);
    let plain = unet.forward(sample, 999.0, ehs, None).unwrap();

    let mut same = Recorder {
        replace_with_plain: true,
        ..Default::default()
    };
    let out = unet.forward(sample, 999.0, ehs, Some(&mut same)).unwrap();
    assert_eq!(
        max_abs_diff(&plain, &out),
        0.0,
        "replacing with plain attention must be exact"
    );

    let mut zero = Recorder {
        zero_layer: Some("mid_block.temp_attentions.0.transformer_blocks.0.attn1".into()),
        ..Default::default()
    };
    let out = unet.forward(sample, 999.0, ehs, Some(&mut zero)).unwrap();
    assert!(
        max_abs_diff(&plain, &out) > 1e-3,
        "a replaced attention must change the output"
    );
}
