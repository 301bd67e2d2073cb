from tessellm import hookimpl

# The plugin API versions this package is written for (tessellm refuses it outside them).
TESSELLM_PLUGIN_API = ">=1.0,<2"


@hookimpl
def register_quantization_methods(register):
    register("compressed-tensors", "tessellm_quant_compressed_tensors.method:CompressedTensors")
