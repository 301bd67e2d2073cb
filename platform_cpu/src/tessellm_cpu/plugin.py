from tessellm import hookimpl


@hookimpl
def register_platforms(register):
    register("cpu", "tessellm_cpu.platform:CpuPlatform")
