from tessellm import hookimpl

# The plugin API versions this package is written for (tessellm refuses it outside them).
TESSELLM_PLUGIN_API = ">=1.0,<2"


@hookimpl
def register_quantization_methods(register):
    register("int8", "tessellm_quant_int8.methods:Int8W8A8")
    register("int8_weight_only", "tessellm_quant_int8.methods:Int8WeightOnly")
