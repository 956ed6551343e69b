//! Flex: the masked convolution and the training BatchNorm (with the residual add and ReLU
//! after it) on our CPU kernels, each with its own backward.
//!
//! Forward, input gradient and weight gradient run on [`MaskedConvPlan`] (sparse where
//! [`ast_kernels::conv::sparse_is_faster`], else im2col + GEMM). The weight gradient is
//! computed at every position only when the caller asks for it (mask-event iterations, where
//! growth ranks inactive positions), else only at the active positions. The BatchNorm runs on
//! [`ast_kernels::norm`]. Geometries or dtypes the kernels do not cover take the generic
//! path.

use std::any::{Any, TypeId};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::ops::{ConvOptions, FloatTensor};
use burn::tensor::{DType, TensorPrimitive};

use super::{generic_batch_norm_train, generic_masked_conv2d, NormOptions, NormOutput};
use ast_kernels::conv::{ConvGeometry, GradBuffers, MaskedConvPlan};
use ast_kernels::norm::{self, NormShape};
use ast_kernels::pool;

#[cfg(test)]
mod kernel_tests;

static FLEX_KERNELS: AtomicBool = AtomicBool::new(true);

/// Whether Flex's masked layers run on the [`ast_kernels`] (the default) or on burn's generic
/// operations (the reference; for comparisons and benchmarks). Process-wide.
pub fn flex_kernels_enabled() -> bool {
    FLEX_KERNELS.load(Ordering::Relaxed)
}

/// Turns Flex's use of the [`ast_kernels`] on or off for the whole process.
pub fn set_flex_kernels(enabled: bool) {
    FLEX_KERNELS.store(enabled, Ordering::Relaxed);
}

/// The masked convolution's inputs, handed back when `B` has no fast path here.
pub(super) type ConvInputs<B> = (
    Tensor<B, 4>,
    Tensor<B, 4>,
    Tensor<B, 4, Bool>,
    Option<Tensor<B, 1>>,
);

/// The batch norm's inputs, handed back when `B` has no fast path here.
pub(super) type NormInputs<B> = (
    Tensor<B, 4>,
    Tensor<B, 1>,
    Tensor<B, 1>,
    Option<Tensor<B, 4>>,
);

/// `value` as `U`, which the caller checked (by `TypeId`) to be `T` itself.
fn same<T: 'static, U: 'static>(value: T) -> U {
    let mut slot = Some(value);
    (&mut slot as &mut dyn Any)
        .downcast_mut::<Option<U>>()
        .and_then(Option::take)
        .expect("a type checked equal by TypeId")
}

fn is<B: 'static, T: 'static>() -> bool {
    TypeId::of::<B>() == TypeId::of::<T>()
}

/// [`super::masked_conv2d`] on the kernels when `B` is Flex or `Autodiff<Flex>` (no or
/// balanced checkpointing); the inputs back otherwise.
pub(super) fn masked_conv2d<B: Backend>(
    (x, weight, mask, bias): ConvInputs<B>,
    options: ConvOptions<2>,
    dense_weight_grad: bool,
) -> Result<Tensor<B, 4>, ConvInputs<B>> {
    fn run<B: Backend, T: Backend>(
        (x, weight, mask, bias): ConvInputs<B>,
        f: impl FnOnce(ConvInputs<T>) -> Tensor<T, 4>,
    ) -> Tensor<B, 4> {
        same(f((same(x), same(weight), same(mask), same(bias))))
    }
    let inputs = (x, weight, mask, bias);
    if is::<B, Flex>() {
        return Ok(run(inputs, |i| conv_forward(i, options)));
    }
    if is::<B, Autodiff<Flex>>() {
        return Ok(run(inputs, |i| {
            conv_autodiff::<NoCheckpointing>(i, options, dense_weight_grad)
        }));
    }
    if is::<B, Autodiff<Flex, BalancedCheckpointing>>() {
        return Ok(run(inputs, |i| {
            conv_autodiff::<BalancedCheckpointing>(i, options, dense_weight_grad)
        }));
    }
    Err(inputs)
}

/// [`super::batch_norm_train`] on the kernels when `B` is Flex or `Autodiff<Flex>` (no or
/// balanced checkpointing); the inputs back otherwise.
pub(super) fn batch_norm_train<B: Backend>(
    inputs: NormInputs<B>,
    options: NormOptions,
) -> Result<NormOutput<B>, NormInputs<B>> {
    fn run<B: Backend, T: Backend>(
        (x, gamma, beta, residual): NormInputs<B>,
        f: impl FnOnce(NormInputs<T>) -> NormOutput<T>,
    ) -> NormOutput<B> {
        let out = f((same(x), same(gamma), same(beta), same(residual)));
        NormOutput {
            y: same(out.y),
            mean: same(out.mean),
            var: same(out.var),
        }
    }
    if is::<B, Flex>() {
        return Ok(run(inputs, |i| norm_forward(i, options)));
    }
    if is::<B, Autodiff<Flex>>() {
        return Ok(run(inputs, |i| {
            norm_autodiff::<NoCheckpointing>(i, options)
        }));
    }
    if is::<B, Autodiff<Flex, BalancedCheckpointing>>() {
        return Ok(run(inputs, |i| {
            norm_autodiff::<BalancedCheckpointing>(i, options)
        }));
    }
    Err(inputs)
}

fn conv_forward(
    (x, weight, mask, bias): ConvInputs<Flex>,
    options: ConvOptions<2>,
) -> Tensor<Flex, 4> {
    let Some(geometry) = geometry(&x.dims(), &weight.dims(), &options, weight.dtype()) else {
        return generic_masked_conv2d(x, weight, mask, bias, options);
    };
    let x = contiguous(x.into_primitive().tensor());
    let plan = plan(
        geometry,
        &weight.into_primitive().tensor(),
        mask.into_primitive(),
    );
    let y = Tensor::from_primitive(TensorPrimitive::Float(output(&plan, &x)));
    add_bias(y, bias)
}

fn conv_autodiff<C: CheckpointStrategy>(
    (x, weight, mask, bias): ConvInputs<Autodiff<Flex, C>>,
    options: ConvOptions<2>,
    dense_weight_grad: bool,
) -> Tensor<Autodiff<Flex, C>, 4> {
    let Some(geometry) = geometry(&x.dims(), &weight.dims(), &options, weight.dtype()) else {
        return generic_masked_conv2d(x, weight, mask, bias, options);
    };
    let x = x.into_primitive().tensor();
    let weight = weight.into_primitive().tensor();
    let plan = Arc::new(plan(geometry, &weight.primitive, mask.into_primitive()));
    let input = contiguous(x.primitive);
    let y = output(&plan, &input);
    let y = match MaskedConvBackward
        .prepare::<C>([x.node.clone(), weight.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            BackwardState {
                plan,
                input,
                dense_weight_grad,
            },
            y,
        ),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    add_bias(Tensor::from_primitive(TensorPrimitive::Float(y)), bias)
}

fn norm_forward(
    (x, gamma, beta, residual): NormInputs<Flex>,
    options: NormOptions,
) -> NormOutput<Flex> {
    let Some(shape) = norm_shape(&x, residual.as_ref()) else {
        return generic_batch_norm_train(x, gamma, beta, residual, options);
    };
    let dims = x.dims();
    let [x, gamma, beta] = [float(x), float(gamma), float(beta)];
    let residual = residual.map(float);
    let (y, stats) = norm::forward(
        &shape,
        f32s(&x),
        f32s(&gamma),
        f32s(&beta),
        options.epsilon as f32,
        residual.as_ref().map(f32s),
        options.relu,
    );
    NormOutput {
        y: Tensor::from_primitive(TensorPrimitive::Float(flex(y, dims))),
        mean: vector(stats.mean),
        var: vector(stats.var),
    }
}

fn norm_autodiff<C: CheckpointStrategy>(
    (x, gamma, beta, residual): NormInputs<Autodiff<Flex, C>>,
    options: NormOptions,
) -> NormOutput<Autodiff<Flex, C>> {
    let Some(shape) = norm_shape(&x, residual.as_ref()) else {
        return generic_batch_norm_train(x, gamma, beta, residual, options);
    };
    let dims = x.dims();
    let x = x.into_primitive().tensor();
    let gamma = gamma.into_primitive().tensor();
    let beta = beta.into_primitive().tensor();
    let residual = residual.map(|r| r.into_primitive().tensor());
    let input = contiguous(x.primitive.clone());
    let gamma_values = contiguous(gamma.primitive.clone());
    let beta_values = contiguous(beta.primitive.clone());
    let residual_values = residual.as_ref().map(|r| contiguous(r.primitive.clone()));
    let [x_values, gamma_f32, beta_f32] = [&input, &gamma_values, &beta_values].map(f32s);
    let epsilon = options.epsilon as f32;
    let residual_values = residual_values.as_ref().map(f32s);
    // After a ReLU without a residual the backward recomputes the gate from the input; with a
    // residual it reads the gate's bytes, written by the forward (a quarter of the output's
    // bytes, and the output is not kept alive for the backward).
    let (y, stats, gate) = match (options.relu, residual_values) {
        (true, Some(r)) => {
            let (y, mask, stats) =
                norm::forward_masked(&shape, x_values, gamma_f32, beta_f32, epsilon, Some(r));
            (y, stats, SavedGate::Mask(mask))
        }
        (relu, r) => {
            let (y, stats) = norm::forward(&shape, x_values, gamma_f32, beta_f32, epsilon, r, relu);
            let gate = match relu {
                true => SavedGate::Recompute(beta_f32.to_vec()),
                false => SavedGate::None,
            };
            (y, stats, gate)
        }
    };
    let y = flex(y, dims);
    let state = NormState {
        shape,
        dims,
        input,
        gate,
        inv_std: norm::inv_std(&stats.var, options.epsilon as f32),
        mean: stats.mean.clone(),
        gamma: gamma_values,
    };
    let y = match residual {
        Some(r) => track::<C, 4>([x, gamma, beta, r], state, y),
        None => track::<C, 3>([x, gamma, beta], state, y),
    };
    let untracked = |v: Vec<f32>| Tensor::from_inner(vector(v));
    NormOutput {
        y: Tensor::from_primitive(TensorPrimitive::Float(y)),
        mean: untracked(stats.mean),
        var: untracked(stats.var),
    }
}

/// The kernels' layout of a batch norm's input, or `None` for what they do not cover (non-f32
/// data, a residual of another shape) or when they are switched off: the generic path runs.
fn norm_shape<B: Backend>(x: &Tensor<B, 4>, residual: Option<&Tensor<B, 4>>) -> Option<NormShape> {
    let [batch, channels, h, w] = x.dims();
    let fits = flex_kernels_enabled()
        && x.dtype() == DType::F32
        && residual.is_none_or(|r| r.dims() == x.dims() && r.dtype() == DType::F32);
    fits.then_some(NormShape {
        batch,
        channels,
        plane: h * w,
    })
}

/// The contiguous Flex primitive of a float tensor.
fn float<const D: usize>(t: Tensor<Flex, D>) -> FlexTensor {
    contiguous(t.into_primitive().tensor())
}

fn flex<const D: usize>(values: Vec<f32>, dims: [usize; D]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, dims))
}

fn vector(values: Vec<f32>) -> Tensor<Flex, 1> {
    let len = values.len();
    Tensor::from_primitive(TensorPrimitive::Float(flex(values, [len])))
}

/// Records the batch norm's backward step on the graph (`parents`: `x`, `γ`, `β` and, when
/// there is one, the residual).
fn track<C: CheckpointStrategy, const N: usize>(
    parents: [FloatTensor<Autodiff<Flex, C>>; N],
    state: NormState,
    y: FlexTensor,
) -> FloatTensor<Autodiff<Flex, C>> {
    let nodes = parents.map(|t| t.node);
    match NormBackward.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

/// The kernels' geometry for these shapes, or `None` for what they do not cover (non-f32
/// data, unsupported hyper-parameters) or when they are switched off
/// ([`set_flex_kernels`]): the generic path runs instead.
fn geometry(
    x: &[usize; 4],
    weight: &[usize; 4],
    options: &ConvOptions<2>,
    dtype: DType,
) -> Option<ConvGeometry> {
    if !flex_kernels_enabled() {
        return None;
    }
    let [batch, c_in, h, w] = *x;
    let [c_out, cin_g, kh, kw] = *weight;
    let geometry = ConvGeometry {
        batch,
        c_in,
        in_hw: [h, w],
        c_out,
        kernel: [kh, kw],
        stride: options.stride,
        padding: options.padding,
        dilation: options.dilation,
        groups: options.groups,
    };
    let fits = dtype == DType::F32
        && options.groups >= 1
        && cin_g * options.groups == c_in
        && geometry.supported();
    fits.then_some(geometry)
}

fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("made contiguous f32 before")
}

fn plan(geometry: ConvGeometry, weight: &FlexTensor, mask: FlexTensor) -> MaskedConvPlan {
    let weight = contiguous(weight.clone());
    let mask: Vec<bool> = mask.into_data().to_vec().expect("a bool mask");
    MaskedConvPlan::new(geometry, f32s(&weight), &mask)
}

fn output(plan: &MaskedConvPlan, x: &FlexTensor) -> FlexTensor {
    let g = &plan.geometry;
    let [ho, wo] = g.out_hw().expect("supported geometry");
    let y = plan.forward(f32s(x));
    FlexTensor::from_data(TensorData::new(y, [g.batch, g.c_out, ho, wo]))
}

fn add_bias<B: Backend>(y: Tensor<B, 4>, bias: Option<Tensor<B, 1>>) -> Tensor<B, 4> {
    match bias {
        Some(b) => {
            let c = b.dims()[0];
            y + b.reshape([1, c, 1, 1])
        }
        None => y,
    }
}

#[derive(Debug)]
struct MaskedConvBackward;

#[derive(Debug, Clone)]
struct BackwardState {
    plan: Arc<MaskedConvPlan>,
    input: FlexTensor,
    dense_weight_grad: bool,
}

impl Backward<Flex, 2> for MaskedConvBackward {
    type State = BackwardState;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_weight] = ops.parents;
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let BackwardState {
            plan,
            input,
            dense_weight_grad,
        } = ops.state;
        let g = &plan.geometry;
        let w_shape = [g.c_out, g.c_in / g.groups, g.kernel[0], g.kernel[1]];
        let (input, dy) = match (&node_x, &node_weight) {
            (Some(node_x), Some(node_weight)) if !dense_weight_grad => {
                match fused_grads(&plan, input, dy) {
                    Ok((dw, dx, spent)) => {
                        let dw = FlexTensor::from_data(TensorData::new(dw, w_shape));
                        grads.register::<Flex>(node_weight.id, dw);
                        grads.register::<Flex>(node_x.id, dx);
                        spent.into_iter().for_each(recycle);
                        return;
                    }
                    Err(buffers) => buffers,
                }
            }
            _ => (input, dy),
        };
        // The weight gradient first: it is the input's last use.
        if let Some(node) = node_weight {
            let dw = plan.weight_grad(f32s(&input), f32s(&dy), dense_weight_grad);
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dw, w_shape)));
        }
        if let Some(node) = node_x {
            // No new buffer to allocate and clear for ∂x when one can be reused: the input's,
            // when this state held its last reference (half of ResNet-32's convolutions: the
            // others' inputs are also saved for a ReLU gate), else dy's, when ∂x has its shape
            // and the kernel can run in place (sparse form, stride 1).
            let (mut input, mut dy) = (input, dy);
            let len = g.batch * g.in_len();
            let into_input = match input.try_storage_mut::<f32>() {
                Some(buffer) if buffer.len() == len => {
                    plan.input_grad_into(f32s(&dy), buffer);
                    true
                }
                _ => false,
            };
            let over_dy = !into_input
                && match dy.try_storage_mut::<f32>() {
                    Some(buffer) if buffer.len() == len => plan.input_grad_in_place(buffer),
                    _ => false,
                };
            let dx = if into_input {
                recycle(dy);
                input
            } else if over_dy {
                recycle(input);
                dy
            } else {
                let shape = [g.batch, g.c_in, g.in_hw[0], g.in_hw[1]];
                let dx = FlexTensor::from_data(TensorData::new(plan.input_grad(f32s(&dy)), shape));
                recycle(input);
                recycle(dy);
                dx
            };
            grads.register::<Flex>(node.id, dx);
        } else {
            recycle(input);
            recycle(dy);
        }
    }
}

/// Both gradients of a sparse stride-1 convolution in one pass
/// ([`MaskedConvPlan::sparse_grads`]): `∂x` over the input's buffer when this state held its
/// last reference, else over `dy`'s when `∂x` has its shape and it is not shared, else into a
/// new buffer. Returns the weight gradient, `∂x` and the tensors it is done with (for
/// [`recycle`]), or the two tensors untouched where the fused kernel does not apply.
// Called once per backward of a convolution; the two tensors handed back are moved, not copied.
#[allow(clippy::type_complexity, clippy::result_large_err)]
fn fused_grads(
    plan: &MaskedConvPlan,
    mut input: FlexTensor,
    mut dy: FlexTensor,
) -> Result<(Vec<f32>, FlexTensor, Vec<FlexTensor>), (FlexTensor, FlexTensor)> {
    let g = &plan.geometry;
    if !plan.fuses_sparse_grads() {
        return Err((input, dy));
    }
    let len = g.batch * g.in_len();
    if let Some(x) = input.try_storage_mut::<f32>().filter(|x| x.len() == len) {
        let dw = plan.sparse_grads(GradBuffers::OverInput { x, dy: f32s(&dy) });
        return Ok((dw.expect("a plan that fuses"), input, vec![dy]));
    }
    let same_shape = g.c_in == g.c_out && g.out_hw() == Some(g.in_hw);
    if same_shape {
        if let Some(d) = dy.try_storage_mut::<f32>().filter(|d| d.len() == len) {
            let dw = plan.sparse_grads(GradBuffers::OverDy {
                x: f32s(&input),
                dy: d,
            });
            return Ok((dw.expect("a plan that fuses"), dy, vec![input]));
        }
    }
    let mut dx = pool::take_overwritten(len);
    let dw = plan.sparse_grads(GradBuffers::Separate {
        x: f32s(&input),
        dy: f32s(&dy),
        dx: &mut dx,
    });
    let shape = [g.batch, g.c_in, g.in_hw[0], g.in_hw[1]];
    Ok((
        dw.expect("a plan that fuses"),
        flex(dx, shape),
        vec![input, dy],
    ))
}

/// Hands the buffer of a tensor the backward pass is done with to [`pool`], when this was its
/// last reference (else it stays with its other owners).
fn recycle(t: FlexTensor) {
    if t.is_unique() && t.dtype() == DType::F32 {
        if let Ok(values) = t.into_data().into_vec::<f32>() {
            pool::give(values);
        }
    }
}

#[derive(Debug)]
struct NormBackward;

#[derive(Debug, Clone)]
struct NormState {
    shape: NormShape,
    dims: [usize; 4],
    input: FlexTensor,
    gate: SavedGate,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    gamma: FlexTensor,
}

/// What the backward needs for the ReLU's gate ([`norm::ReluGate`]).
#[derive(Debug, Clone)]
enum SavedGate {
    None,
    Mask(Vec<u8>),
    Recompute(Vec<f32>),
}

impl<const N: usize> Backward<Flex, N> for NormBackward {
    type State = NormState;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        // ∂x is written over dy's buffer: no copy when the gradient is not shared.
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let dy: Vec<f32> = dy.into_data().into_vec().expect("an f32 gradient");
        let s = ops.state;
        let residual = ops.parents.get(3).is_some_and(Option::is_some);
        let gate = match &s.gate {
            SavedGate::None => norm::ReluGate::None,
            SavedGate::Mask(m) => norm::ReluGate::Mask(m),
            SavedGate::Recompute(beta) => norm::ReluGate::Recompute { beta },
        };
        let d = norm::backward(
            &s.shape,
            f32s(&s.input),
            gate,
            dy,
            &s.mean,
            &s.inv_std,
            f32s(&s.gamma),
            residual,
        );
        let dims = s.dims;
        let channels = [s.shape.channels];
        recycle(s.input);
        if let SavedGate::Mask(m) = s.gate {
            pool::give_bytes(m);
        }
        let results = [
            Some(flex(d.x, dims)),
            Some(flex(d.gamma, channels)),
            Some(flex(d.beta, channels)),
            d.residual.map(|r| flex(r, dims)),
        ];
        for (parent, grad) in ops.parents.iter().zip(results) {
            if let (Some(node), Some(grad)) = (parent, grad) {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1×1 convolution's inputs on `B`.
    fn conv_inputs<B: Backend>() -> ConvInputs<B> {
        let device = Default::default();
        (
            Tensor::ones([1, 2, 3, 3], &device),
            Tensor::ones([2, 2, 1, 1], &device),
            Tensor::<B, 4, Int>::ones([2, 2, 1, 1], &device).bool(),
            None,
        )
    }

    /// A batch norm's inputs on `B`.
    fn norm_inputs<B: Backend>() -> NormInputs<B> {
        let device = Default::default();
        (
            Tensor::ones([2, 3, 2, 2], &device),
            Tensor::ones([3], &device),
            Tensor::zeros([3], &device),
            None,
        )
    }

    #[test]
    fn flex_and_autodiff_flex_take_the_kernels_other_backends_the_generic_path() {
        let options = || ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
        let y = masked_conv2d::<Flex>(conv_inputs(), options(), false).expect("Flex");
        assert_eq!(y.into_data().to_vec::<f32>().unwrap(), vec![2.0; 18]);
        assert!(masked_conv2d::<Autodiff<Flex>>(conv_inputs(), options(), false).is_ok());
        type Balanced = Autodiff<Flex, BalancedCheckpointing>;
        assert!(masked_conv2d::<Balanced>(conv_inputs(), options(), false).is_ok());
        // A backend this crate has no kernels for: the inputs come back untouched.
        type Twice = Autodiff<Autodiff<Flex>>;
        let (x, ..) = masked_conv2d::<Twice>(conv_inputs(), options(), false).unwrap_err();
        assert_eq!(x.dims(), [1, 2, 3, 3]);

        let options = NormOptions {
            epsilon: 1e-5,
            relu: false,
        };
        assert!(batch_norm_train::<Flex>(norm_inputs(), options).is_ok());
        assert!(batch_norm_train::<Autodiff<Flex>>(norm_inputs(), options).is_ok());
        assert!(batch_norm_train::<Twice>(norm_inputs(), options).is_err());
    }

    #[test]
    fn what_the_kernels_do_not_cover_is_left_to_the_generic_path() {
        let options = ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
        assert!(geometry(&[1, 2, 5, 5], &[4, 2, 3, 3], &options, DType::F32).is_some());
        assert!(geometry(&[1, 2, 5, 5], &[4, 2, 3, 3], &options, DType::F64).is_none());
        assert!(geometry(&[1, 2, 2, 2], &[4, 2, 3, 3], &options, DType::F32).is_none());
        assert!(geometry(&[1, 3, 5, 5], &[4, 2, 3, 3], &options, DType::F32).is_none());
    }

    #[test]
    fn a_batch_norm_the_kernel_does_not_cover_is_left_to_the_generic_path() {
        let device = Default::default();
        let x = Tensor::<Flex, 4>::zeros([2, 3, 4, 5], &device);
        let same = Tensor::<Flex, 4>::zeros([2, 3, 4, 5], &device);
        let other = Tensor::<Flex, 4>::zeros([2, 3, 5, 4], &device);
        let shape = norm_shape(&x, Some(&same)).expect("covered");
        assert_eq!((shape.batch, shape.channels, shape.plane), (2, 3, 20));
        assert!(norm_shape(&x, Some(&other)).is_none());
        let doubles = x.clone().cast(burn::tensor::FloatDType::F64);
        assert_eq!(doubles.dtype(), DType::F64);
        assert!(norm_shape(&doubles, None).is_none());
    }
}
