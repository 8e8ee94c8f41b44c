"""Stop signals in one process: noted inside the training loop, raised outside it, other
signals ignored, and a rank blocked past the grace period ends itself after on_deadline ran.
Each case runs in a child process (the deadline path exits the process)."""

import subprocess
import sys
import textwrap

PRELUDE = textwrap.dedent("""
    import os, signal, sys, time
    from gmeta.trainer.parallel.comm import StopRequest
    from gmeta.trainer.parallel.signals import Stopped, StopSignals
    request = StopRequest()
""")


def _child(body: str, timeout=60):
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True,
                          text=True, timeout=timeout)


def test_noted_in_the_loop_raised_outside_it_and_other_signals_ignored():
    proc = _child("""
        got = []
        with StopSignals(request, grace_s=60) as s:
            signal.signal(signal.SIGUSR1, lambda *a: got.append("usr1"))
            s.in_loop = True
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.5)
            assert got == ["usr1"] and request.signal is None   # not a stop
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            assert request.signal == signal.SIGTERM              # noted, nothing raised
            s.in_loop = False
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
                raise SystemExit("SIGINT outside the loop did not raise")
            except Stopped as exc:
                assert exc.exit_code == 130, exc.exit_code
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        print("ok")
        os._exit(0)  # before the watcher's grace period for the noted SIGTERM ends
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_a_rank_blocked_past_the_grace_period_runs_on_deadline_and_exits():
    proc = _child("""
        def on_deadline(signum):
            print(f"deadline {signum}", flush=True)

        with StopSignals(request, grace_s=1, on_deadline=on_deadline, rank_label="rank 3") as s:
            s.in_loop = True
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)   # blocked (as in a collective whose peer died): never gets to stop
        print("not reached")
    """)
    assert proc.returncode == 143, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.strip() == "deadline 15"
    assert "[gmeta rank 3] SIGTERM: the rank did not stop within 1 s" in proc.stderr
