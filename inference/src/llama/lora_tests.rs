//! Tests of LoRA adapters and gradient checkpointing on the training and serving paths.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, TensorId};
use candle_nn::VarBuilder;

use super::tests::{tiny_config, trainable};
use super::*;

fn spec(targets: &[Projection]) -> LoraSpec {
    LoraSpec { rank: 3, alpha: 6.0, targets: targets.to_vec(), seed: 7 }
}

fn ids() -> (Tensor, Tensor) {
    let ids = Tensor::new(&[[3u32, 7, 1, 9, 4, 2], [5, 5, 8, 1, 0, 6]], &Device::Cpu).unwrap();
    let targets = Tensor::new(&[7u32, 1, 9, 4, 2, 5, 8, 1, 0, 6, 3, 3], &Device::Cpu).unwrap();
    (ids, targets)
}

fn loss_of(model: &Llama) -> (Tensor, Tensor) {
    let (ids, targets) = ids();
    let logits = model.forward_train(&ids, 0.0).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits.reshape((12, 50)).unwrap(), &targets).unwrap();
    (logits, loss)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Moves every `B` off zero, so every `A` gets a gradient and the adapters change the output.
fn perturb(adapters: &[NamedAdapter]) {
    for adapter in adapters {
        adapter.b.set(&adapter.b.randn_like(0.0, 0.2).unwrap()).unwrap();
    }
}

/// The whole-layer node's hand-written adapter backward against the op-by-op layer (candle's autograd through
/// the same adapters): logits, every adapter's gradient, and no gradient for any base weight.
#[test]
fn lora_layer_matches_op_by_op_and_trains_only_adapters() {
    let cfg = tiny_config();
    let (varmap, model) = trainable(&cfg);
    let (model, adapters) = model.with_lora(&spec(&Projection::ALL)).unwrap();
    assert_eq!(adapters.len(), 2 * 7);
    perturb(&adapters);
    let grads = WeightGrads::new();
    let layered = model.clone().with_weight_grads(grads.clone());
    let (want_logits, want_loss) = loss_of(&model);
    let want = want_loss.backward().unwrap();
    let (got_logits, got_loss) = loss_of(&layered);
    let mut got = got_loss.backward().unwrap();
    let adapter_ids: Vec<TensorId> =
        adapters.iter().flat_map(|a| [a.a.as_tensor().id(), a.b.as_tensor().id()]).collect();
    let collected = grads.take_all();
    assert!(collected.iter().all(|(id, _)| adapter_ids.contains(id)), "only adapters collect gradients");
    assert_eq!(collected.len(), adapter_ids.len(), "every adapter matrix collects a gradient");
    let tensors: Vec<&Tensor> = adapters.iter().flat_map(|a| [a.a.as_tensor(), a.b.as_tensor()]).collect();
    let sink = WeightGrads::new();
    for (id, buffer) in collected {
        let weight = tensors.iter().find(|t| t.id() == id).unwrap();
        sink.contribute(weight, buffer.len(), |buf, _| buf.copy_from_slice(&buffer));
    }
    sink.drain_into(&mut got, &tensors).unwrap();
    assert!(max_abs_diff(&want_logits, &got_logits) < 1e-4);
    for adapter in &adapters {
        for (name, var) in adapter.var_names().iter().zip([&adapter.a, &adapter.b]) {
            let (a, b) = (want.get(var.as_tensor()).unwrap(), got.get(var.as_tensor()).unwrap());
            let scale = max_abs(a);
            assert!(scale > 0.0, "{name} has a zero gradient");
            let diff = max_abs_diff(a, b);
            assert!(diff < 1e-3 * scale.max(1.0), "{name}: gradient differs by {diff} (scale {scale})");
        }
    }
    for (name, var) in varmap.data().lock().unwrap().iter() {
        assert!(want.get(var.as_tensor()).is_none() && got.get(var.as_tensor()).is_none(), "{name} is frozen");
    }
}

/// A finite difference of the loss along one entry of an adapter matches the whole-layer node's gradient.
#[test]
fn lora_gradient_matches_a_finite_difference() {
    let cfg = tiny_config();
    let (_varmap, model) = trainable(&cfg);
    let (model, adapters) = model.with_lora(&spec(&[Projection::V, Projection::Down])).unwrap();
    perturb(&adapters);
    let grads = WeightGrads::new();
    let model = model.with_weight_grads(grads.clone());
    let mut store = loss_of(&model).1.backward().unwrap();
    let tensors: Vec<&Tensor> = adapters.iter().flat_map(|a| [a.a.as_tensor(), a.b.as_tensor()]).collect();
    grads.drain_into(&mut store, &tensors).unwrap();
    for adapter in &adapters {
        for var in [&adapter.a, &adapter.b] {
            let grad = store.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let at = grad.iter().enumerate().max_by(|x, y| x.1.abs().total_cmp(&y.1.abs())).unwrap().0;
            let original = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let eps = 1e-2f32;
            let loss_at = |delta: f32| {
                let mut moved = original.clone();
                moved[at] += delta;
                var.set(&Tensor::from_vec(moved, var.shape(), &Device::Cpu).unwrap()).unwrap();
                let loss = loss_of(&model).1.to_scalar::<f32>().unwrap();
                grads.clear();
                loss
            };
            let numeric = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(original, var.shape(), &Device::Cpu).unwrap()).unwrap();
            let analytic = grad[at];
            assert!(
                (numeric - analytic).abs() < 2e-2 * analytic.abs().max(1e-2),
                "{}: analytic {analytic} vs numeric {numeric}",
                adapter.weight
            );
        }
    }
}

/// `B` starts at zero: the adapted model's logits are the base model's, on both training paths and serving.
#[test]
fn fresh_adapters_leave_the_logits_unchanged() {
    let cfg = tiny_config();
    let (_varmap, model) = trainable(&cfg);
    let base = loss_of(&model).0;
    let (adapted, _) = model.clone().with_lora(&spec(&Projection::ALL)).unwrap();
    assert_eq!(max_abs_diff(&base, &loss_of(&adapted).0), 0.0);
    let layered = adapted.clone().with_weight_grads(WeightGrads::new());
    assert!(max_abs_diff(&base, &loss_of(&layered).0) < 1e-5);
    let tokens = [3u32, 7, 1, 9, 4, 2];
    let serve = |m: &Llama| {
        let mut cache = m.new_cache(8);
        m.forward_batch(&mut [BatchChunk { tokens: &tokens, cache: &mut cache, all_logits: true }]).unwrap().remove(0)
    };
    assert!(max_abs_diff(&serve(&model), &serve(&adapted)) < 1e-5);
}

/// Folding the adapters into the weights (`W + (α/r)·B·A`, what a saved checkpoint holds) gives the adapted
/// model's logits, and the serving path of the adapted model agrees with both.
#[test]
fn merged_weights_give_the_adapted_logits() {
    let cfg = tiny_config();
    let (varmap, model) = trainable(&cfg);
    let (adapted, adapters) = model.with_lora(&spec(&Projection::ALL)).unwrap();
    perturb(&adapters);
    let by_weight: HashMap<&str, &NamedAdapter> = adapters.iter().map(|a| (a.weight.as_str(), a)).collect();
    let merged: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(name, var)| {
            let w = match by_weight.get(name.as_str()) {
                Some(adapter) => adapter.adapter().merged(var.as_tensor()).unwrap(),
                None => var.as_tensor().detach(),
            };
            (name.clone(), w)
        })
        .collect();
    let merged = Llama::new(&cfg, VarBuilder::from_tensors(merged, DType::F32, &Device::Cpu)).unwrap();
    let want = loss_of(&adapted.clone().with_weight_grads(WeightGrads::new())).0;
    assert!(max_abs(&(want.clone() - loss_of(&adapted).0).unwrap()) < 1e-4);
    assert!(max_abs_diff(&want, &loss_of(&merged).0) < 1e-4);
    let tokens = [3u32, 7, 1, 9, 4, 2];
    let serve = |m: &Llama| {
        let mut cache = m.new_cache(8);
        m.forward_batch(&mut [BatchChunk { tokens: &tokens, cache: &mut cache, all_logits: true }]).unwrap().remove(0)
    };
    let served = serve(&adapted);
    assert!(max_abs_diff(&served, &serve(&merged)) < 1e-4);
    assert!(max_abs_diff(&served, &want.get(0).unwrap()) < 1e-4);
    assert!(adapted.weights_may_change(), "trainable adapters rule out prefix caching");
}

/// Recomputing the layers' activations in the backward gives the same gradients, full fine-tune and LoRA.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let cfg = tiny_config();
    for lora in [false, true] {
        let (varmap, model) = trainable(&cfg);
        let (model, adapters) =
            if lora { model.with_lora(&spec(&Projection::ALL)).unwrap() } else { (model, Vec::new()) };
        perturb(&adapters);
        let mut weights: Vec<Tensor> = varmap.all_vars().iter().map(|v| v.as_tensor().clone()).collect();
        weights.extend(adapters.iter().flat_map(|a| [a.a.as_tensor().clone(), a.b.as_tensor().clone()]));
        let weights: Vec<&Tensor> = weights.iter().collect();
        let run = |checkpoint: bool| {
            let grads = WeightGrads::new();
            let m = model.clone().with_weight_grads(grads.clone()).with_gradient_checkpointing(checkpoint);
            let (logits, loss) = loss_of(&m);
            let mut store = loss.backward().unwrap();
            grads.drain_into(&mut store, &weights).unwrap();
            (logits, store)
        };
        let (plain_logits, plain) = run(false);
        let (checkpointed_logits, checkpointed) = run(true);
        assert_eq!(max_abs_diff(&plain_logits, &checkpointed_logits), 0.0);
        let mut compared = 0;
        for weight in &weights {
            match (plain.get(weight), checkpointed.get(weight)) {
                (Some(a), Some(b)) => {
                    assert!(max_abs_diff(a, b) <= 1e-6 * max_abs(a).max(1.0), "lora={lora}: gradients differ");
                    compared += 1;
                }
                (None, None) => {}
                _ => panic!("lora={lora}: a gradient exists with checkpointing on or off only"),
            }
        }
        assert_eq!(compared, if lora { 2 * 7 * 2 } else { weights.len() }, "lora={lora}");
    }
}

/// The op-by-op layer cannot checkpoint: residual dropout with checkpointing is refused, not silently kept.
#[test]
fn checkpointing_refuses_the_op_by_op_layer() {
    let cfg = tiny_config();
    let (_varmap, model) = trainable(&cfg);
    let model = model.with_weight_grads(WeightGrads::new()).with_gradient_checkpointing(true);
    let err = model.forward_train(&ids().0, 0.1).expect_err("must be refused").to_string();
    assert!(err.contains("gradient checkpointing"), "{err}");
}

#[test]
fn bad_lora_specs_are_refused() {
    let cfg = tiny_config();
    let (_varmap, model) = trainable(&cfg);
    for bad in
        [LoraSpec { rank: 0, ..spec(&Projection::ALL) }, LoraSpec { alpha: 0.0, ..spec(&Projection::ALL) }, spec(&[])]
    {
        assert!(model.clone().with_lora(&bad).is_err(), "{bad:?}");
    }
}
