"""The entry-point module: tessellm reads the supported API range and the hooks here."""

from tessellm import hookimpl

# The plugin API versions this package is written for (tessellm refuses it outside them).
TESSELLM_PLUGIN_API = ">=1.0,<2"


@hookimpl
def register_models(register):
    # A string target: the model module (and torch) load only when a Granite model does.
    register("GraniteForCausalLM", "tessellm_granite_example.model:GraniteForCausalLM")
