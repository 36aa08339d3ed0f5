"""Host-tier support: finding and bootstrapping ComfyUI (comfy_env), loading the pack and running prompts with
ComfyUI's executor (comfy_runner), tiny models built from ComfyUI's own classes (comfy_tiny,
comfy_tiny_checkpoint, comfy_tiny_controlnet), and a probe script of ComfyUI's autograd behaviour
(probe_comfy_autograd). Imported as `support.<module>` with tests/host on sys.path."""
