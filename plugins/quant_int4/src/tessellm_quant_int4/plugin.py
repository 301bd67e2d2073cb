from tessellm import hookimpl

# The plugin API versions this package is written for (tessellm refuses it outside them).
TESSELLM_PLUGIN_API = ">=1.0,<2"


@hookimpl
def register_quantization_methods(register):
    register("woq_int4", "tessellm_quant_int4.woq:WeightOnlyInt4")
    register("woq_grid", "tessellm_quant_int4.woq:GridWeightOnlyInt4")
    register("gptq", "tessellm_quant_int4.gptq_awq:GPTQ")
    register("awq", "tessellm_quant_int4.gptq_awq:AWQ")
