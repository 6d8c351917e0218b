"""Runs int8 inputs through a .tflite model in TFLite Micro's interpreter.

Called by `host-trainer tflite-check` (host-trainer/src/int8/tflite/check.rs):

  run_tflm.py MODEL.tflite INPUTS.bin OUTPUTS.bin
      INPUTS.bin: N inputs of the model's int8 input, back to back;
      OUTPUTS.bin: the N int8 outputs, back to back.
  run_tflm.py MODEL.tflite INPUT.bin TENSORS.bin --tensors 3,5,8
      one input, run with every tensor preserved; TENSORS.bin: the listed
      tensors' int8 bytes, back to back, in the order given.
"""

import argparse
import sys

import numpy as np
from tflite_micro import runtime


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("inputs")
    ap.add_argument("outputs")
    ap.add_argument("--tensors", help="comma-separated tensor indices to dump")
    a = ap.parse_args()
    config = (
        runtime.InterpreterConfig.kPreserveAllTensors
        if a.tensors
        else runtime.InterpreterConfig.kAllocationRecording
    )
    interp = runtime.Interpreter.from_file(a.model, intrepreter_config=config)
    inp = interp.get_input_details(0)
    shape, n_in = tuple(inp["shape"]), int(np.prod(inp["shape"]))
    data = np.fromfile(a.inputs, dtype=np.int8)
    if data.size % n_in:
        sys.exit(f"{a.inputs}: {data.size} bytes is not a multiple of the input size {n_in}")
    images = data.reshape((-1,) + shape[1:])
    with open(a.outputs, "wb") as out:
        for img in images:
            interp.set_input(img.reshape(shape), 0)
            interp.invoke()
            if a.tensors:
                for t in a.tensors.split(","):
                    data = interp.GetTensor(int(t), 0)["tensor_data"]
                    out.write(np.asarray(data).astype(np.int8).tobytes())
            else:
                out.write(np.asarray(interp.get_output(0)).astype(np.int8).tobytes())
    print(f"run_tflm.py: {len(images)} inputs through TFLM", file=sys.stderr)


if __name__ == "__main__":
    main()
