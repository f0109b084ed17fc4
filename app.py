"""A Gradio page that shows a masked-diffusion answer being written, step by step (issue 16).

    python app.py                              the embedded dual-stream RemeDi (its own UPS), on 127.0.0.1:7860
    python app.py --model embedded --ups_head out/remedi/ups_head.safetensors   the embedded backbone + a UPS head
    python app.py --model GSAI-ML/LLaDA-8B-Instruct --host 0.0.0.0 --port 8080  any backbone the loader takes

Open http://127.0.0.1:7860, type a question, pick the confidence source ('upstream' = LLaDA's own rule, no
re-masking) and the lengths, and press Run. Every denoising step adds a row to the trajectory table as soon as the
sampler records it: each answer position is a cell, blue when committed at that step, orange when re-masked at it
(the token removed, struck through), grey while masked, white when kept (the colours of the trajectory pictures,
remedi_patches.trajectory_views). The decoded answer and the call's cost (NFE, tokens/s) follow when the call ends.

The model flags are generate.py's (remedi_patches.model_args); every sampler flag (--decoding, --threshold,
--ups_temperature, ...) sets the page's starting values, and the page's fields override steps / gen_length /
block_length / temperature / confidence source per run. A bad setting shows one message in the page.

Layout: pure helpers (settings from the page's fields, the trajectory table of a RowTrace) | the sampler in a worker
thread feeding a queue (StreamingTrajectory, stream_sample) | the Gradio wiring (build_app) | the command line.
"""
from __future__ import annotations

import argparse
import html
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch

from remedi_patches.backbones import EvalModel, kind_of, max_length_of
from remedi_patches.cli import USER_ERRORS, ArgumentParser, UserError, one_line, run_main
from remedi_patches.confidence import CONFIDENCE_SOURCES
from remedi_patches.model_args import add_model_args, model_spec_from_args
from remedi_patches.modeling_wrappers import has_ups_stream
from remedi_patches.remasking import StepRecord, Trajectory
from remedi_patches.sampling import (CHAT_CHOICES, CHAT_HELP, LENGTH_DEFAULTS, TEMPLATE_HELP, PromptWindow,
                                     SamplerSettings, add_sampler_args, check_sampler_args, decode_answers,
                                     decoding_of, encode_prompts, needs_ups_head, sample, settings_from_args)
from remedi_patches.trajectory_views import (COLOURS, MASK_TEXT, RowTrace, decoding_text, row_trace, step_changes,
                                             token_texts)

UPSTREAM = "upstream"  # the page's name for confidence_source None: LLaDA's own rule, never re-masks
DEFAULT_MODEL = "embedded_remedi"  # the shipped embedded model with its own UPS stream
DEFAULT_PROMPT = "Tom has 3 apples. He buys 5 more. He gives away 2. How many apples does Tom have now?"
HISTORY_CELLS = 4096  # the table keeps its last rows within this many cells (long runs stay light to stream)
SHOWN = ("committed", "remasked", "mask", "kept")  # the cell kinds of the page, in legend order
CSS = """#trajectory .steps{border-collapse:collapse;font-family:monospace;font-size:11px;letter-spacing:-0.5px}
#trajectory .steps td{border:1px solid #ccc;padding:1px 2px;white-space:pre;text-align:center;min-width:1.2em;
color:#222}
#trajectory .steps th{font-weight:normal;padding-right:6px;text-align:right;font-size:11px;white-space:nowrap}
#trajectory td.remasked span{text-decoration:line-through}
#trajectory .legend span{display:inline-block;padding:1px 6px;margin-right:4px;border:1px solid #ccc;color:#222}
#trajectory .scroll{overflow-x:auto}"""


# ---------------------------------------------------------------- pure helpers (no Gradio, no model)


def source_choices() -> list[str]:
    """The page's confidence sources: the registered ones, then 'upstream' (confidence_source None)."""
    return sorted(CONFIDENCE_SOURCES) + [UPSTREAM]


def whole(name: str, value) -> int:
    """A page field that must hold a whole number (Gradio hands numbers over as int or float, an empty box as None)."""
    if value is None or isinstance(value, bool) or not float(value).is_integer():
        raise ValueError(f"{name} must be a whole number, got {value!r}; type one into the {name} box")
    return int(value)


def page_settings(base: SamplerSettings, source: str, steps, gen_length, block_length,
                  temperature) -> SamplerSettings:
    """`base` (the command line's settings) with the page's fields; ValueError (SamplerSettings' message) when
    they do not fit together, e.g. steps not a multiple of the block count."""
    if temperature is None:
        raise ValueError("temperature is empty; type a number >= 0 (0 = argmax)")
    return base.replace(confidence_source=None if source == UPSTREAM else source, steps=whole("steps", steps),
                        gen_length=whole("gen_length", gen_length), block_length=whole("block_length", block_length),
                        temperature=float(temperature))


def cell_kinds(trace: RowTrace) -> list[list[str]]:
    """(S + 1) x G cell kinds of a trace: 'committed' / 'remasked' at the step that did it, else 'mask' or 'kept'."""
    rows = [["mask" if int(t) == trace.mask_id else "kept" for t in state] for state in trace.states]
    for change in step_changes(trace):
        row = rows[change.index + 1]
        for pos, _ in change.committed:
            row[pos] = "committed"
        for pos, _ in change.remasked:
            row[pos] = "remasked"
    return rows


def legend_html() -> str:
    spans = "".join(f"<span style='background:{COLOURS[k]}'>{k}</span>" for k in SHOWN)
    return f"<p class='legend'>{spans} (re-masked cells show the token removed, struck through)</p>"


def steps_html(trace: RowTrace, text: Callable[[int], str], max_cells: int = HISTORY_CELLS) -> str:
    """The trajectory table of a trace: one row per state (start, then after each step; the newest last), one
    coloured cell per answer position, cut to its last rows when it would exceed `max_cells` cells. A summary line
    of the last step heads it. text: token id -> display string (trajectory_views.token_texts)."""
    kinds, changes = cell_kinds(trace), step_changes(trace)
    width = trace.states.shape[1]
    first = max(0, len(kinds) - max(1, max_cells // max(1, width)))
    if changes:
        last = changes[-1]
        head = (f"after step {last.index + 1} (block {last.block}): {len(last.committed)} committed, "
                f"{len(last.remasked)} re-masked, {last.answer_masks} of {width} answer positions masked")
    else:
        head = f"start: all {width} answer positions masked"
    lines = [f"<p class='head'>{html.escape(head)}</p>", legend_html(), "<div class='scroll'>",
             f"<table class='steps' data-steps='{len(changes)}'>"]
    if first:
        lines.append(f"<tr><th>({first} earlier rows not shown)</th></tr>")
    for s in range(first, len(kinds)):
        label = "start" if s == 0 else f"step {s} (block {trace.block[s - 1]})"
        cells = []
        for pos, kind in enumerate(kinds[s]):
            token = int(trace.states[s - 1 if kind == "remasked" else s, pos])
            cells.append(f"<td class='{kind}' data-kind='{kind}' title='position {pos}' "
                         f"style='background:{COLOURS[kind]}'><span>{html.escape(text(token))}</span></td>")
        lines.append(f"<tr><th>{label}</th>{''.join(cells)}</tr>")
    lines.append("</table></div>")
    return "\n".join(lines)


def start_html(width: int) -> str:
    """The view before the first step: one row of masks."""
    return steps_html(RowTrace(torch.full((1, width), -1), [], [], [], mask_id=-1), lambda token: MASK_TEXT)


# ---------------------------------------------------------------- the sampler, streamed


@dataclass
class StreamingTrajectory(Trajectory):
    """A Trajectory that also puts every step it records on `inbox`, for a reader in another thread."""

    inbox: queue.Queue = field(default_factory=queue.Queue)

    def record(self, *args, **kwargs) -> None:
        super().record(*args, **kwargs)
        if self.record_steps:
            self.inbox.put(self.steps[-1])


def stream_sample(bundle: EvalModel, ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                  settings: SamplerSettings, seed: int = 0
                  ) -> Iterator[tuple[Trajectory, Optional[torch.Tensor]]]:
    """sample() in a worker thread. Yields (the steps recorded so far, None) once per denoising step as the sampler
    records it, then (the call's whole trajectory with its cost, output ids (B, Lp + gen_length)). An error of the
    call is raised here; closing the generator early waits for the call to end (one model call at a time)."""
    trajectory = StreamingTrajectory(keep_tokens=True)
    outcome: dict = {}

    def work() -> None:
        try:
            torch.manual_seed(seed)
            outcome["out"] = sample(bundle, ids, attention_mask, settings, trajectory)
        except BaseException as err:  # handed to the reading thread
            outcome["error"] = err
        finally:
            trajectory.inbox.put(None)

    worker = threading.Thread(target=work, name="sampler", daemon=True)
    worker.start()
    received: list[StepRecord] = []
    try:
        while (record := trajectory.inbox.get()) is not None:
            received.append(record)
            yield Trajectory(keep_tokens=True, steps=list(received)), None
    finally:
        worker.join()
    if "error" in outcome:
        raise outcome["error"]
    yield trajectory, outcome["out"]


@dataclass
class Session:
    """What the page runs on: the loaded bundle and the command line's choices."""

    bundle: EvalModel
    base: SamplerSettings          # the command line's sampler settings (the page overrides some fields)
    window: Optional[int]          # the model's window (backbones.max_length_of)
    chat: str = "auto"
    template: Optional[str] = None
    name: str = DEFAULT_MODEL

    @property
    def default_source(self) -> str:
        """The command line's source, else 'ups' when the model has a UPS (stream or head), else 'upstream'."""
        if self.base.confidence_source is not None:
            return self.base.confidence_source
        has_ups = self.bundle.ups_head is not None or has_ups_stream(self.bundle.model)
        return "ups" if has_ups else UPSTREAM

    def run(self, prompt: str, source: str, steps, gen_length, block_length, temperature,
            seed=0) -> Iterator[tuple[str, str, str]]:
        """(trajectory HTML, answer, cost line) after every step, then with the answer and cost filled in.
        ValueError (before the model runs) for a bad setting or an empty prompt."""
        settings = page_settings(self.base, source, steps, gen_length, block_length, temperature)
        if not (prompt or "").strip():
            raise ValueError("the prompt is empty; type a question into the prompt box")
        if needs_ups_head(self.bundle, settings):
            raise ValueError(f"confidence source 'ups' needs a UPS, and {self.name} has none; start the app with "
                             f"--ups_head PATH (or --model {DEFAULT_MODEL}), or choose another source")
        fit = PromptWindow(self.window, settings.gen_length, flag="gen_length")
        ids, mask = fit.crop_batch(*encode_prompts(self.bundle.tokenizer, [prompt], self.chat, self.template))
        text = token_texts(self.bundle.tokenizer, self.bundle.mask_id)
        yield start_html(settings.gen_length), "", ""
        for trajectory, out in stream_sample(self.bundle, ids, mask, settings, whole("seed", seed)):
            view = steps_html(row_trace(trajectory, 0, ids.shape[1], self.bundle.mask_id), text)
            if out is None:
                yield view, "", ""
                continue
            answer = decode_answers(self.bundle.tokenizer, out, ids.shape[1], self.bundle.stop_ids)[0]
            decoding = decoding_text(settings, decoding_of(self.bundle.model, settings.decoding))
            yield view, answer, (f"(steps {settings.steps}, gen_length {settings.gen_length}, block_length "
                                 f"{settings.block_length}) {decoding} | {trajectory.cost()}")


# ---------------------------------------------------------------- the page (Gradio)


def build_app(session: Session):
    """The Blocks page of a session (launch it with .queue().launch(...))."""
    import gradio as gr

    def on_run(*fields):
        try:
            yield from session.run(*fields)
        except USER_ERRORS as err:
            raise gr.Error(one_line(str(err)), print_exception=False) from None

    base = session.base
    with gr.Blocks(title="RemeDi: watch the answer being written", analytics_enabled=False) as demo:
        gr.Markdown(f"## RemeDi: watch the answer being written\nModel: `{session.name}`. Each row is one denoising "
                    "step; each cell one answer position.")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt", lines=3, elem_id="prompt")
                source = gr.Radio(source_choices(), value=session.default_source, label="Confidence source "
                                  "('upstream' = LLaDA's rule, no re-masking)", elem_id="source")
                with gr.Row():
                    steps = gr.Number(base.steps, label="steps", precision=0, elem_id="steps")
                    gen_length = gr.Number(base.gen_length, label="gen_length", precision=0, elem_id="gen_length")
                    block_length = gr.Number(base.block_length, label="block_length", precision=0,
                                             elem_id="block_length")
                with gr.Row():
                    temperature = gr.Number(base.temperature, label="temperature", minimum=0, elem_id="temperature")
                    seed = gr.Number(0, label="seed", precision=0, elem_id="seed")
                run = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column(scale=4):
                view = gr.HTML(start_html(base.gen_length), elem_id="trajectory")
                answer = gr.Textbox(label="Answer", lines=2, elem_id="answer")
                cost = gr.Textbox(label="Cost", elem_id="cost")
        run.click(on_run, [prompt, source, steps, gen_length, block_length, temperature, seed], [view, answer, cost])
    return demo


def serve(session: Session, host: str = "127.0.0.1", port: int = 7860, share: bool = False, wait: bool = True):
    """Serve the page (system fonts only: it needs no network): until interrupted, or with wait=False return the
    running Blocks at once (close it with .close())."""
    import gradio as gr

    demo = build_app(session).queue()
    theme = gr.themes.Default(font=["sans-serif"], font_mono=["monospace"])
    try:
        demo.launch(server_name=host, server_port=port, share=share, ssr_mode=False, theme=theme, css=CSS,
                    footer_links=[], prevent_thread_lock=not wait)
    except OSError as err:
        raise UserError(f"cannot serve on {host}:{port} ({one_line(str(err))}); pass a free --port, or another "
                        "--host") from None
    return demo


# ---------------------------------------------------------------- command line


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__)
    add_model_args(p, defaults={"model_name": DEFAULT_MODEL})
    p.add_argument("--chat", choices=CHAT_CHOICES, default="auto", help=CHAT_HELP)
    p.add_argument("--prompt_template", default=None, help=TEMPLATE_HELP)
    add_sampler_args(p, defaults=LENGTH_DEFAULTS)
    server = p.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    server.add_argument("--port", type=int, default=7860, help="port to serve on")
    server.add_argument("--share", action="store_true", help="also ask Gradio for a public share link (off: local)")
    return p


def load_session(args: argparse.Namespace) -> Session:
    """The bundle of the model flags, checked as generate.py checks them (SEDD refused in one line)."""
    check_sampler_args(args)
    spec = model_spec_from_args(args)
    bundle = spec.load()
    if getattr(kind_of(bundle.model), "name", None) == "sedd":  # its forward takes noise levels, not masked inputs
        raise ValueError(f"{spec.model_name} is a SEDD model, which this masked-diffusion sampler cannot run; use "
                         f"python SMDM/sedd/sample.py --model {spec.model_name}")
    window = max_length_of(bundle.model)
    settings = settings_from_args(args, window)
    PromptWindow(window, settings.gen_length)  # one-line error when gen_length alone does not fit
    return Session(bundle, settings, window, args.chat, args.prompt_template, spec.model_name or "embedded")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if not 0 <= args.port <= 65535:  # before the model loads
        raise UserError(f"--port {args.port} is no TCP port; pass one in 0-65535 (default 7860)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    serve(load_session(args), args.host, args.port, args.share)


if __name__ == "__main__":
    run_main(main)
