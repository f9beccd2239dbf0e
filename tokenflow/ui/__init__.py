"""TokenFlow's staged web app (`tokenflow-ui`, the optional extra `ui`): invert, keyframes, NN field, edit.

stages.py does the work without a browser (the same public functions as the command line);
form.py turns the page's fields into the command line's overrides; app.py is the Gradio page.
"""
