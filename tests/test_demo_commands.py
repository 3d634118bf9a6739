"""The commands `make demo` prints can be pasted into a shell as they are."""
import shlex

from demo import run


def test_printed_commands_survive_a_shell():
    argv = ["encoding/encode", "--images", "demo out/curated/shards/*.tar", "--prompt", "a fox's {red} tail"]
    assert shlex.split(run.command_line(argv)) == ["python", *argv]
