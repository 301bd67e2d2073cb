from tessellm import hookimpl


@hookimpl
def register_platforms(register):
    register("tpu", "tessellm_tpu.platform:TpuPlatform")
