"""`python -m gateway` and the `gateway` script: the command line, quiet on Ctrl-C and `| head`."""

import os
import signal
import sys

EXIT_PIPE_CLOSED = 141  # what a shell reports for a command stopped by SIGPIPE (128 + 13)


def main() -> int:
    """Run the command line; Ctrl-C at any moment ends it without a traceback."""
    # Loading the command (aiohttp, msgspec) takes a few hundred milliseconds on a busy
    # machine: an interrupt meanwhile ends the process as SIGINT does by default, rather than
    # with a traceback of whichever import it cut short. The command itself gets Python's
    # handler back, and `cli.main` turns its KeyboardInterrupt into status 130.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    from gateway.cli.main import main as command

    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        status = command()
        # Flushed here, not at exit: a pipe's stdout is block-buffered, so a short output is
        # written only now, and a reader gone by then fails this write, not the interpreter's
        # (which would print 'Exception ignored ... BrokenPipeError' and exit 120).
        if sys.stdout is not None:  # None when started with stdout closed (`>&-`)
            sys.stdout.flush()
        return status
    except KeyboardInterrupt:  # between the two lines above and cli.main's own guard
        return 130
    except BrokenPipeError:
        # The reader stopped early (`gateway trace ... | head`): nothing is wrong, and what is
        # still buffered must not fail again at exit, so stdout points at /dev/null from here.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_PIPE_CLOSED
    finally:
        # On the way out (threads joined, logs flushed) an interrupt has nothing left to stop.
        signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    raise SystemExit(main())
