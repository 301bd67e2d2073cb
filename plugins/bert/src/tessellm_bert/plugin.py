from tessellm import hookimpl
from tessellm.hookspecs import Register

# The plugin API versions this package is written for (tessellm refuses it outside them).
TESSELLM_PLUGIN_API = ">=1.1,<2"


@hookimpl
def register_models(register: Register) -> None:
    # An encoder (tessellm.interfaces.pooling.EncoderModel): served by the pooling engine.
    register("BertModel", "tessellm_bert.model:BertModel")
