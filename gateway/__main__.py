"""`python -m gateway` and the `gateway` script: the command line, quiet on Ctrl-C throughout."""

import signal


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
        return command()
    except KeyboardInterrupt:  # between the two lines above and cli.main's own guard
        return 130
    finally:
        # On the way out (threads joined, logs flushed) an interrupt has nothing left to stop.
        signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    raise SystemExit(main())
