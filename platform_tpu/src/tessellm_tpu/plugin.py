from tessellm import hookimpl

# The plugin API versions this package is written for (tessellm refuses it outside them).
TESSELLM_PLUGIN_API = ">=1.0,<2"


@hookimpl
def register_platforms(register):
    register("tpu", "tessellm_tpu.platform:TpuPlatform")


@hookimpl
def register_attention_backends(register):
    register("xla", "tessellm_tpu.attention:XlaPagedAttention")
