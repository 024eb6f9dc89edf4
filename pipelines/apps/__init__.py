"""The applications over the pipelines: the ``guidance-engine`` command (generate, compare, eval,
img2img, edit, batch, calibrate-linear-ag, methods) and the Gradio demo. They import the library
(``guidance_engine.pipelines``) and the toy world, never the other way round."""
