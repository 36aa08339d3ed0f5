"""The VCT nodes: thin ComfyUI glue around `vct_ops`. Reached only as `<pack>.nodes`."""
from comfy_api.latest import ComfyExtension, io

from . import host
from .files import VCTLoadInversion, VCTSaveInversion, register_routes
from .invert import VCTDDIMInvert, VCTNullTextInvert
from .learn import VCTConceptLearn
from .prompt import VCTConceptPrompt
from .sample import VCTDualBranchSampler

NODES = [VCTDDIMInvert, VCTNullTextInvert, VCTConceptLearn, VCTConceptPrompt, VCTDualBranchSampler, VCTSaveInversion,
         VCTLoadInversion]


class VCTExtension(ComfyExtension):
    """Lists the pack's nodes for ComfyUI."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        """Return the node classes this pack registers."""
        return list(NODES)


async def comfy_entrypoint() -> VCTExtension:
    """Return the extension ComfyUI loads, adding the pack's HTTP route to the server when one runs."""
    # Here rather than in on_load, which ComfyUI 0.3.6x never calls.
    server = host.prompt_server()
    if server is not None:
        register_routes(server)
    return VCTExtension()
