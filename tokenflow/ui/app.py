"""The web page: settings, the four stages' buttons and outputs, the equivalent command, a stop button.

    tokenflow-ui model=tiny                  # http://127.0.0.1:7860, the page's fields filled from the overrides
    tokenflow-ui --host 0.0.0.0 --port 8080 --out runs

Every stage goes through one queue of one (Gradio's: a second visitor's request waits, and the page
shows its place); the work is stages.Workbench's, which calls the same functions as the command line.
No `from __future__ import annotations` here: Gradio reads the handlers' annotations (gr.Request) at run time.
"""

import argparse
import sys
from pathlib import Path

from ..config import METHODS, MODES, RULES, ConfigError
from ..figures.tokens import default_step
from ..models.presets import PRESETS
from ..pipeline import RANDOM_WEIGHTS_WARNING
from .form import Form, form_from_overrides
from .stages import VIDEO_SUFFIXES, Workbench, save_upload

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860
STAGE_QUEUE = "stage"  # every stage's event shares this queue of one
INTRO = """# TokenFlow
Edit a video with a text prompt, one stage at a time: **1** invert the clip and sample it back, **2** edit one
step's keyframes jointly, **3** look at the NN field that carries their features to the other frames, **4**
edit the whole video. Each stage reuses what the one before made (the inverted clip, the loaded model).
The command below repeats the settings on the command line."""


def model_note(model: str) -> str:
    preset = PRESETS.get(model)
    if preset is not None and preset.random_only:
        return f"**{model}**: {RANDOM_WEIGHTS_WARNING}."
    return "" if preset is None else f"**{model}**: {preset.description}"


def build_page(bench: Workbench, first: Form):
    """The Gradio Blocks of the app, its fields filled from `first`."""
    import gradio as gr

    def form_of(upload, model, prompt, method, steps, interval, propagation, mode, seed, extra) -> Form:
        video = "sample" if not upload else str(save_upload(upload, bench.out_root / "uploads"))
        return Form(video=video, model=model, prompt=prompt, method=method, steps=steps, keyframe_interval=interval,
                    propagation=propagation, mode=mode, seed=seed, extra=extra)

    def checked(values):
        """(the run's settings, its command), or (None, the command line's one-line error)."""
        try:
            form = form_of(*values)
            return form.config(), form.command()
        except (ConfigError, ValueError, FileNotFoundError) as e:
            return None, f"error: {e}"

    def reporter(progress):
        def report(fraction, what):
            progress(fraction, desc=what)
        return report

    def command_of(*values):
        return checked(values)[1]

    with gr.Blocks(title="TokenFlow", analytics_enabled=False) as page:  # no calls home: it may run offline
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label=f"clip ({', '.join(VIDEO_SUFFIXES)}); none: the generated sample clip",
                                 file_count="single", type="filepath", elem_id="upload")
                model = gr.Dropdown(list(PRESETS), value=first.model, label="model", elem_id="model")
                note = gr.Markdown(model_note(first.model), elem_id="model-note")
                prompt = gr.Textbox(first.prompt, label="prompt", elem_id="prompt")
                method = gr.Radio(list(METHODS), value=first.method, label="technique")
                with gr.Row():
                    steps = gr.Number(first.steps, label="steps", precision=0, elem_id="steps")
                    interval = gr.Number(first.keyframe_interval, label="keyframe interval", precision=0)
                    seed = gr.Number(first.seed, label="seed", precision=0)
                propagation = gr.Radio(list(RULES), value=first.propagation, label="propagation rule")
                mode = gr.Dropdown(list(MODES), value=first.mode, label="mode")
                extra = gr.Textbox(first.extra, label="more overrides, one per line (as on the command line)",
                                   lines=4, elem_id="extra")
            with gr.Column(scale=2):
                command = gr.Textbox(first.command(), label="the same on the command line", interactive=False,
                                     elem_id="command", buttons=["copy"])
                stop = gr.Button("Stop the running stage", variant="stop", elem_id="stop")
                stop_note = gr.Markdown(elem_id="stop-note")
                with gr.Tab("1. invert"):
                    invert_go = gr.Button("Invert and reconstruct", variant="primary", elem_id="invert-go")
                    invert_msg = gr.Textbox(label="invert", interactive=False, lines=2, elem_id="invert-status")
                    invert_img = gr.Image(label="source | its reconstruction", show_label=False, type="numpy",
                                          elem_id="invert-image")
                with gr.Tab("2. keyframes"):
                    with gr.Row():
                        kf_step = gr.Number(default_step(first.steps), label="denoising step (0: the first)", precision=0,
                                            elem_id="keyframes-step")
                        kf_go = gr.Button("Edit this step's keyframes", variant="primary", elem_id="keyframes-go")
                    kf_msg = gr.Textbox(label="keyframes", interactive=False, lines=2, elem_id="keyframes-status")
                    kf_img = gr.Image(label="keyframes: source | edited jointly", show_label=False, type="numpy",
                                      elem_id="keyframes-image")
                with gr.Tab("3. NN field"):
                    with gr.Row():
                        nn_frame = gr.Number(1, label="frame", precision=0, elem_id="nn-frame")
                        nn_step = gr.Number(default_step(first.steps), label="denoising step (0: the first)", precision=0,
                                            elem_id="nn-step")
                        nn_go = gr.Button("Draw its NN field", variant="primary", elem_id="nn-go")
                    nn_msg = gr.Textbox(label="NN field", interactive=False, lines=2, elem_id="nn-status")
                    nn_img = gr.Image(label="NN field onto the nearest keyframe", show_label=False, type="numpy",
                                      elem_id="nn-image")
                with gr.Tab("4. edit"):
                    edit_go = gr.Button("Edit the whole video", variant="primary", elem_id="edit-go")
                    edit_msg = gr.Textbox(label="edit", interactive=False, lines=2, elem_id="edit-status")
                    edit_video = gr.Video(label="source | edit", interactive=False, elem_id="edit-video")
                    edit_files = gr.File(label="downloads", file_count="multiple", interactive=False, elem_id="edit-files")
                    edit_facts = gr.JSON(label="run.json", elem_id="edit-facts")

        fields = [upload, model, prompt, method, steps, interval, propagation, mode, seed, extra]
        # one listener for every field, its last change winning (a keystroke each: never an older command last)
        gr.on([f.change for f in fields], command_of, fields, command, trigger_mode="always_last",
              concurrency_limit=1, concurrency_id="command", show_progress="hidden")
        model.change(model_note, model, note, queue=False)

        # every field a named parameter: Gradio hands the progress bar and the request to named ones only
        def invert(upload, model, prompt, method, steps, interval, propagation, mode, seed, extra,
                   progress=gr.Progress(), request: gr.Request = None):
            cfg, said = checked((upload, model, prompt, method, steps, interval, propagation, mode, seed, extra))
            if cfg is None:
                return said, None
            r = bench.invert(cfg, reporter(progress), owner=_session(request))
            return r.message, r.images.get("invert")

        def keyframes(upload, model, prompt, method, steps, interval, propagation, mode, seed, extra, step,
                      progress=gr.Progress(), request: gr.Request = None):
            cfg, said = checked((upload, model, prompt, method, steps, interval, propagation, mode, seed, extra))
            if cfg is None:
                return said, None
            r = bench.keyframes(cfg, step, reporter(progress), owner=_session(request))
            return r.message, r.images.get("keyframes")

        def nn_field(upload, model, prompt, method, steps, interval, propagation, mode, seed, extra, frame, step,
                     progress=gr.Progress(), request: gr.Request = None):
            cfg, said = checked((upload, model, prompt, method, steps, interval, propagation, mode, seed, extra))
            if cfg is None or frame is None:
                return said if cfg is None else "error: choose a frame", None
            r = bench.nn_field(cfg, int(frame), step, reporter(progress), owner=_session(request))
            return r.message, r.images.get("nn_field")

        def edit(upload, model, prompt, method, steps, interval, propagation, mode, seed, extra,
                 progress=gr.Progress(), request: gr.Request = None):
            cfg, said = checked((upload, model, prompt, method, steps, interval, propagation, mode, seed, extra))
            if cfg is None:
                return said, None, None, None
            r = bench.edit(cfg, reporter(progress), owner=_session(request))
            if not r.ok:
                return r.message, None, None, None
            shown = r.files.get("side_by_side") or r.files.get("edited")
            return r.message, shown, list(r.files.values()), r.facts

        def stop_running(request: gr.Request = None):
            return bench.request_stop(_session(request))

        queued = dict(concurrency_limit=1, concurrency_id=STAGE_QUEUE)
        invert_go.click(invert, fields, [invert_msg, invert_img], **queued)
        kf_go.click(keyframes, fields + [kf_step], [kf_msg, kf_img], **queued)
        nn_go.click(nn_field, fields + [nn_frame, nn_step], [nn_msg, nn_img], **queued)
        edit_go.click(edit, fields, [edit_msg, edit_video, edit_files, edit_facts], **queued)
        stop.click(stop_running, None, stop_note, queue=False)
    page.queue(default_concurrency_limit=1)
    return page


def _session(request) -> str | None:
    return None if request is None else request.session_hash


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tokenflow-ui", allow_abbrev=False,
        description="TokenFlow's staged web app. OVERRIDES (the tokenflow command's, e.g. model=tiny steps=20) "
                    "fill the page's fields.")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to serve on (default {DEFAULT_HOST}: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--out", default="outputs",
                        help="folder of the edits' run folders and the uploaded clips (default outputs)")
    parser.add_argument("overrides", nargs="*", help="key=value settings, as the tokenflow command takes them")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        first = form_from_overrides(args.overrides)  # checked now: a bad override is one line, before any serving
        import gradio  # noqa: F401
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ImportError:
        print('error: the web app needs Gradio: pip install "tokenflow-from-scratch[ui]"', file=sys.stderr)
        sys.exit(2)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    page = build_page(Workbench(out), first)
    print(f"[tokenflow-ui] serving on http://{args.host}:{args.port} (Ctrl-C ends it)", file=sys.stderr)
    page.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(out)], show_error=False, quiet=True,
                footer_links=[])
