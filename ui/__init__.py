"""stylelora's Gradio front end: `stylelora ui`, or `from ui.app import build_app`."""
