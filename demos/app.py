"""Launcher for the Gradio demo; the app lives in guidance_engine.pipelines.apps.demo_app (also `guidance-engine demo`)."""
from guidance_engine.pipelines.apps.demo_app import build_demo, launch  # noqa: F401

if __name__ == "__main__":
    launch()
