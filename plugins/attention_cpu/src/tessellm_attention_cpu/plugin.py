from tessellm import hookimpl


@hookimpl
def register_attention_backends(register):
    register("cpu", "tessellm_attention_cpu.backend:CpuPagedAttention")
