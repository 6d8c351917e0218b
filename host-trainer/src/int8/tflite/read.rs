//! Reading a `.tflite` file back (through the flatbuffers verifier) into a
//! plain summary: what the tests compare with the blob it came from, and
//! what `tflite-check` uses to find the tensors it compares.

use anyhow::{bail, Context, Result};

use super::schema::tflite as fb;

/// One tensor of the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSummary {
    /// Name.
    pub name: String,
    /// Shape.
    pub shape: Vec<i32>,
    /// Element type, e.g. `INT8`.
    pub ty: String,
    /// Whether it has constant data.
    pub constant: bool,
    /// Quantization scales (empty: none).
    pub scale: Vec<f32>,
    /// Quantization zero points.
    pub zero_point: Vec<i64>,
    /// Quantized dimension.
    pub quantized_dimension: i32,
}

/// One op of the file.
#[derive(Debug, Clone, PartialEq)]
pub struct OpSummary {
    /// Builtin op name, e.g. `CONV_2D`.
    pub code: String,
    /// Input tensors.
    pub inputs: Vec<i32>,
    /// Output tensors.
    pub outputs: Vec<i32>,
    /// Padding (`SAME`/`VALID`) and strides of conv and pool ops.
    pub window: Option<(String, i32, i32)>,
    /// Fused activation (`NONE`, `RELU`) of conv, ADD and FC.
    pub activation: Option<String>,
}

/// A `.tflite` file's single subgraph, description and metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Schema version.
    pub version: u32,
    /// The model description.
    pub description: String,
    /// Metadata entries: name and the buffer as (lossy) UTF-8.
    pub metadata: Vec<(String, String)>,
    /// Tensors.
    pub tensors: Vec<TensorSummary>,
    /// Ops in execution order.
    pub ops: Vec<OpSummary>,
    /// Subgraph inputs.
    pub inputs: Vec<i32>,
    /// Subgraph outputs.
    pub outputs: Vec<i32>,
}

impl Summary {
    /// The op names in order.
    pub fn op_names(&self) -> Vec<&str> {
        self.ops.iter().map(|o| o.code.as_str()).collect()
    }

    /// The metadata entry `name`, if any.
    pub fn metadata(&self, name: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses and verifies `bytes` as a one-subgraph `.tflite` model.
pub fn read(bytes: &[u8]) -> Result<Summary> {
    if bytes.len() < 8 || !fb::model_buffer_has_identifier(bytes) {
        bail!("not a TFLite flatbuffer (no `TFL3` file identifier)");
    }
    let model = fb::root_as_model(bytes).context("the flatbuffer fails verification")?;
    let subgraphs = model.subgraphs().context("model without subgraphs")?;
    if subgraphs.len() != 1 {
        bail!("{} subgraphs: expected 1", subgraphs.len());
    }
    let g = subgraphs.get(0);
    let buffers = model.buffers().context("model without buffers")?;
    let has_data = |b: u32| {
        b != 0
            && (b as usize) < buffers.len()
            && buffers
                .get(b as usize)
                .data()
                .is_some_and(|d| !d.is_empty())
    };
    let tensors = g
        .tensors()
        .context("subgraph without tensors")?
        .iter()
        .map(|t| tensor(&t, has_data(t.buffer())))
        .collect();
    let codes = model
        .operator_codes()
        .context("model without operator codes")?;
    let ops = g
        .operators()
        .context("subgraph without operators")?
        .iter()
        .map(|op| operator(&op, &codes))
        .collect::<Result<_>>()?;
    let metadata = model
        .metadata()
        .iter()
        .flatten()
        .map(|m| {
            let data = buffers
                .get(m.buffer() as usize)
                .data()
                .map(|d| d.bytes().to_vec())
                .unwrap_or_default();
            (
                m.name().unwrap_or_default().to_string(),
                String::from_utf8_lossy(&data).into_owned(),
            )
        })
        .collect();
    Ok(Summary {
        version: model.version(),
        description: model.description().unwrap_or_default().to_string(),
        metadata,
        tensors,
        ops,
        inputs: g.inputs().map(|v| v.iter().collect()).unwrap_or_default(),
        outputs: g.outputs().map(|v| v.iter().collect()).unwrap_or_default(),
    })
}

fn tensor(t: &fb::Tensor<'_>, constant: bool) -> TensorSummary {
    let q = t.quantization();
    TensorSummary {
        name: t.name().unwrap_or_default().to_string(),
        shape: t.shape().map(|s| s.iter().collect()).unwrap_or_default(),
        ty: format!("{:?}", t.type_()),
        constant,
        scale: q
            .and_then(|q| q.scale())
            .map(|s| s.iter().collect())
            .unwrap_or_default(),
        zero_point: q
            .and_then(|q| q.zero_point())
            .map(|s| s.iter().collect())
            .unwrap_or_default(),
        quantized_dimension: q.map_or(0, |q| q.quantized_dimension()),
    }
}

fn operator(
    op: &fb::Operator<'_>,
    codes: &flatbuffers::Vector<'_, flatbuffers::ForwardsUOffset<fb::OperatorCode<'_>>>,
) -> Result<OpSummary> {
    let i = op.opcode_index() as usize;
    if i >= codes.len() {
        bail!(
            "operator code index {i} out of range ({} codes)",
            codes.len()
        );
    }
    let code = codes.get(i).builtin_code();
    let (window, activation) = if let Some(o) = op.builtin_options_as_conv_2_doptions() {
        (
            Some((format!("{:?}", o.padding()), o.stride_h(), o.stride_w())),
            Some(o.fused_activation_function()),
        )
    } else if let Some(o) = op.builtin_options_as_pool_2_doptions() {
        (
            Some((format!("{:?}", o.padding()), o.stride_h(), o.stride_w())),
            None,
        )
    } else if let Some(o) = op.builtin_options_as_add_options() {
        (None, Some(o.fused_activation_function()))
    } else if let Some(o) = op.builtin_options_as_fully_connected_options() {
        (None, Some(o.fused_activation_function()))
    } else {
        (None, None)
    };
    Ok(OpSummary {
        code: format!("{code:?}"),
        inputs: op.inputs().map(|v| v.iter().collect()).unwrap_or_default(),
        outputs: op.outputs().map(|v| v.iter().collect()).unwrap_or_default(),
        window,
        activation: activation.map(|a| format!("{a:?}")),
    })
}
