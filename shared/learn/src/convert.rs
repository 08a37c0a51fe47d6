//! Exact conversion between burn modules and flat [`ModelParams`].
//!
//! Tensors are named by their module path (`fc1.weight`, `Cnn.conv2.bias`, ...) in the order
//! burn visits them, which is the field order of the model structs. Values are copied bit for
//! bit: `load(params_of(m)) == m`.

use std::sync::Arc;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};
use fedge_core::{ModelParams, ParamLayout, ParamsError, TensorSpec};
use thiserror::Error;

/// Why parameters could not be loaded into a model.
#[derive(Debug, Error, PartialEq)]
pub enum ConvertError {
    /// The parameters are for another architecture.
    #[error("parameters do not fit the model: {0}")]
    Layout(String),
    /// Reading a tensor back from the device failed.
    #[error("cannot read tensor `{0}` from the device")]
    Read(String),
    /// The layout itself is invalid.
    #[error(transparent)]
    Params(#[from] ParamsError),
    /// The examples do not fit the model (image size, a label past the last class).
    #[error("the data do not fit the model: {0}")]
    Data(String),
}

#[derive(Default)]
struct Collector {
    path: Vec<String>,
    specs: Vec<TensorSpec>,
    data: Vec<f32>,
    error: Option<ConvertError>,
}

impl ModuleVisitor for Collector {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let name = self.path.join(".");
        let tensor = param.val();
        let shape = tensor.dims().to_vec();
        match tensor.into_data().convert::<f32>().as_slice::<f32>() {
            Ok(values) => self.data.extend_from_slice(values),
            Err(_) => {
                self.error.get_or_insert(ConvertError::Read(name.clone()));
            }
        }
        self.specs.push(TensorSpec { name, shape });
    }
}

/// The layout of `model`'s parameters (names and shapes), without copying values.
pub fn layout_of<M: Module>(model: &M) -> Result<Arc<ParamLayout>, ConvertError> {
    Ok(params_of(model)?.layout().clone())
}

/// Copies every float parameter of `model` into flat [`ModelParams`].
pub fn params_of<M: Module>(model: &M) -> Result<ModelParams, ConvertError> {
    let mut c = Collector::default();
    model.visit(&mut c);
    if let Some(e) = c.error {
        return Err(e);
    }
    let layout = Arc::new(ParamLayout::new(c.specs)?);
    Ok(ModelParams::new(layout, c.data)?)
}

struct Loader<'a> {
    path: Vec<String>,
    params: &'a ModelParams,
    index: usize,
    error: Option<ConvertError>,
}

impl ModuleMapper for Loader<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let i = self.index;
        self.index += 1;
        let layout = self.params.layout();
        let name = self.path.join(".");
        let Some(spec) = layout.specs().get(i) else {
            self.error
                .get_or_insert(ConvertError::Layout(format!("model has more tensors than the parameters ({name})")));
            return param;
        };
        let dims = param.lazy_shape().to_vec();
        if spec.name != name || spec.shape != dims {
            self.error.get_or_insert(ConvertError::Layout(format!(
                "tensor {i} is `{}` {:?} in the parameters but `{name}` {dims:?} in the model",
                spec.name, spec.shape
            )));
            return param;
        }
        let values = self.params.data()[layout.range(i)].to_vec();
        param.map(|old| {
            let device = old.device();
            let grad = old.is_require_grad();
            Tensor::<D>::from_data(TensorData::new(values, spec.shape.clone()), &device).set_require_grad(grad)
        })
    }
}

/// Loads `params` into `model`, checking names and shapes tensor by tensor.
pub fn load_params<M: Module>(model: M, params: &ModelParams) -> Result<M, ConvertError> {
    let mut loader = Loader { path: Vec::new(), params, index: 0, error: None };
    let model = model.map(&mut loader);
    if let Some(e) = loader.error {
        return Err(e);
    }
    if loader.index != params.layout().specs().len() {
        return Err(ConvertError::Layout(format!(
            "parameters have {} tensors, the model {}",
            params.layout().specs().len(),
            loader.index
        )));
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Model, ModelKind};
    use burn::tensor::Device;

    #[test]
    fn round_trip_is_exact() {
        let device = Device::flex();
        for kind in [ModelKind::TwoNn, ModelKind::Cnn] {
            let a = params_of(&Model::init(kind, 10, &device)).unwrap();
            // Load into a differently initialised model, read back: bit-identical.
            let b = params_of(&load_params(Model::init(kind, 10, &device), &a).unwrap()).unwrap();
            assert_eq!(a.layout(), b.layout());
            assert!(a.data().iter().zip(b.data()).all(|(x, y)| x.to_bits() == y.to_bits()));
            assert_eq!(a.content_hash(), b.content_hash());
        }
    }

    #[test]
    fn names_follow_module_paths() {
        let p = params_of(&Model::init(ModelKind::TwoNn, 10, &Device::flex())).unwrap();
        let names: Vec<&str> = p.layout().specs().iter().map(|s| s.name.as_str()).collect();
        assert!(names.iter().any(|n| n.ends_with("fc1.weight")), "{names:?}");
        assert_eq!(p.tensor(names[0]).unwrap().len(), p.layout().specs()[0].numel());
    }

    #[test]
    fn wrong_architecture_is_refused() {
        let device = Device::flex();
        let two_nn = params_of(&Model::init(ModelKind::TwoNn, 10, &device)).unwrap();
        let err = load_params(Model::init(ModelKind::Cnn, 10, &device), &two_nn).unwrap_err();
        assert!(matches!(err, ConvertError::Layout(_)), "{err}");
    }
}
