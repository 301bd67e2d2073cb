from tessellm import hookimpl

# The plugin API versions this package is written for (tessellm refuses it outside them).
TESSELLM_PLUGIN_API = ">=1.0,<2"


@hookimpl
def register_quantization_methods(register):
    register("fp8", "tessellm_quant_fp8.method:Fp8Method")
