from tessellm import hookimpl

# The plugin API versions this package is written for (tessellm refuses it outside them).
TESSELLM_PLUGIN_API = ">=1.0,<2"


@hookimpl
def register_platforms(register):
    register("cpu", "tessellm_cpu.platform:CpuPlatform")
