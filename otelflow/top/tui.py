"""The curses loop of `otelflow top`: keys, colours, resize; data comes from a background thread
so a slow or dead agent never freezes the keys."""

from __future__ import annotations

import contextlib
import curses
import threading
from collections.abc import Callable

from otelflow.top.model import Model
from otelflow.top.view import PANES, SORTS, Filter, FilterError, State, frame

KEY_ESC = 27


class Poller:
    """Calls `load` every `interval` seconds in a thread; `latest` is the newest model."""

    def __init__(self, load: Callable[[], Model], interval: float) -> None:
        self.load = load
        self.interval = interval
        self.latest = Model()
        self.stop = threading.Event()
        self.changed = threading.Event()
        self.thread = threading.Thread(target=self._run, name="top-poll", daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.latest = self.load()
            except Exception as e:  # keep the screen alive and say what happened
                self.latest = Model(problem=f"{type(e).__name__}: {e}")
            self.changed.set()
            self.stop.wait(self.interval)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def handle_key(state: State, key: int) -> bool:
    """Apply one key to the state; False means quit."""
    if state.prompt is not None:
        if key in (curses.KEY_ENTER, 10, 13):
            try:
                state.filter = Filter.parse(state.prompt)
                state.message = ""
            except FilterError as e:
                state.message = str(e)
            state.prompt = None
        elif key == KEY_ESC:
            state.prompt = None
        elif key in (curses.KEY_BACKSPACE, 127, 8):
            state.prompt = state.prompt[:-1]
        elif 32 <= key < 127:
            state.prompt += chr(key)
        return True
    if state.help:
        state.help = False
        return key != ord("q")
    ch = chr(key) if 0 <= key < 256 else ""
    if ch == "q":
        return False
    if ch in ("h", "?"):
        state.help = True
    elif ch in ("1", "2", "3"):
        state.pane = PANES[int(ch) - 1]
    elif key == 9:  # tab
        state.pane = PANES[(PANES.index(state.pane) + 1) % len(PANES)]
    elif ch in ("b", "p", "c"):
        state.sort = {"b": "bytes", "p": "packets", "c": "connections"}[ch]
    elif ch == "s":
        state.sort = SORTS[(SORTS.index(state.sort) + 1) % len(SORTS)]
    elif ch == "/":
        state.prompt = state.filter.text
        state.message = ""
    elif ch == "x":
        state.filter = Filter()
        state.message = ""
    return True


def run(stdscr: curses.window, poller: Poller, state: State) -> None:
    curses.curs_set(0)
    curses.set_escdelay(25)  # Esc closes the filter prompt at once (the default waits a second)
    styles = {name: curses.A_NORMAL for name in ("normal", "status")}
    styles.update(title=curses.A_BOLD, header=curses.A_REVERSE, tabs=curses.A_BOLD, prompt=curses.A_BOLD)
    styles.update(cross=curses.A_BOLD, external=curses.A_BOLD, error=curses.A_BOLD)
    if curses.has_colors():
        curses.start_color()
        curses.use_default_colors()
        for i, (name, fg) in enumerate(
            (("cross", curses.COLOR_YELLOW), ("external", curses.COLOR_MAGENTA), ("error", curses.COLOR_RED)),
            1,
        ):
            curses.init_pair(i, fg, -1)
            styles[name] = curses.color_pair(i) | curses.A_BOLD
    stdscr.timeout(250)
    poller.start()
    while True:
        h, w = stdscr.getmaxyx()
        stdscr.erase()
        for y, (text, style) in enumerate(frame(poller.latest, state, w, h)):
            with contextlib.suppress(curses.error):  # the terminal shrank since getmaxyx
                stdscr.addstr(y, 0, text, styles.get(style, curses.A_NORMAL))
        stdscr.refresh()
        key = stdscr.getch()
        if key == -1 or key == curses.KEY_RESIZE:
            continue
        if not handle_key(state, key):
            return
