"""VCT Save Inversion and VCT Load Inversion: keep the expensive inversion across restarts (files: storage.py)."""
from __future__ import annotations

import logging
import os

from comfy_api.latest import io

from . import progress, storage
from .model import identity
from .payloads import Inversion

log = logging.getLogger("ComfyUI-VCT")


class VCTSaveInversion(io.ComfyNode):
    """Saves an inversion (trajectory and null embeddings) to the output folder."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        """Return the node's schema."""
        return io.Schema(
            node_id="VCTSaveInversion",
            display_name="VCT Save Inversion",
            category="VCT",
            description="Saves an inversion to output/vct_inversions/ so a restart does not redo the null-text "
            "optimisation. The file remembers the model and source image it belongs to.",
            inputs=[
                Inversion.Input("inversion", tooltip="The inversion to save (best after null-text inversion)."),
                io.String.Input("filename_prefix", default="inversion", tooltip="File name start; a counter is "
                                "added (e.g. inversion_00001.safetensors)."),
            ],
            outputs=[],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, inversion, filename_prefix) -> io.NodeOutput:
        """Write the file, log its path and show its name on the node."""
        path = storage.save_inversion(inversion, filename_prefix)
        name = os.path.basename(path)
        log.info("VCT Save Inversion: saved %s", path)
        node_id = getattr(cls.hidden, "unique_id", None)
        server = progress.prompt_server()
        if server is not None and node_id is not None:
            # Progress text is what ComfyUI's frontend itself shows on a node.
            server.send_progress_text(f"saved {storage.INVERSION_FOLDER}/{name}", node_id)
        return io.NodeOutput(ui={"text": [name]})


class VCTLoadInversion(io.ComfyNode):
    """Loads a saved inversion, refusing it for another model or another source image."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        """Return the node's schema."""
        return io.Schema(
            node_id="VCTLoadInversion",
            display_name="VCT Load Inversion",
            category="VCT",
            description="Loads an inversion saved by VCT Save Inversion. It is checked against the model and the "
            "encoded source image, and refused if either differs.",
            inputs=[
                io.Model.Input("model", tooltip="The model the inversion was made with (same LoRAs)."),
                io.Latent.Input("latent", tooltip="The encoded source image the inversion was made from."),
                # A plain list, as ComfyUI's own loaders have: the schema is built again for every
                # node-definitions request, so the frontend's Refresh (R) lists new files. A remote
                # list would reset a loaded workflow's choice to the first file (frontend 1.27).
                io.Combo.Input("inversion_file", options=storage.list_inversions(),
                               tooltip="A file in output/vct_inversions/. After saving a new one, press R "
                               "(Refresh Node Definitions) to list it, as for a new checkpoint."),
            ],
            outputs=[Inversion.Output("inversion", display_name="inversion", tooltip="The loaded inversion.")],
        )

    @classmethod
    def execute(cls, model, latent, inversion_file) -> io.NodeOutput:
        """Load the file and check it belongs to this model and image."""
        node = "VCT Load Inversion"
        identity.check_family(model, node)
        data = storage.load_inversion(inversion_file)
        identity.check_matches_model(data, model, node)
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if samples is None:
            raise ValueError("latent must be a LATENT (connect a VAEEncode of the source image)")
        if tuple(samples.shape) != tuple(data.source_latent.shape):
            raise ValueError(
                f"{node}: {inversion_file} was made from a {tuple(data.source_latent.shape)} latent but the "
                f"connected one is {tuple(samples.shape)}; connect the same source image at the same size"
            )
        if not storage.same_latent(samples, data.source_latent):
            raise ValueError(f"{node}: {inversion_file} was made from another source image; connect that image")
        return io.NodeOutput(data)
