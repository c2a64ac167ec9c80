"""The one exception type a user's own mistake raises.

Entry points in trainer/ catch `UserError` and print its message as a single
line with a non-zero exit; anything else is a bug in tfdp and keeps its
traceback.
"""


class UserError(Exception):
    """A bad flag, file or environment that the user can fix.

    The message names the problem and the fix in one line.
    """


class ClusterError(UserError):
    """A peer worker died, froze or never joined; the job must be relaunched.

    Printed like a UserError, with its own exit code so launchers and
    schedulers can tell it from a bad flag.
    """

    exit_code = 3


class Preempted(UserError):
    """SIGTERM (a scheduler's preemption) stopped training after a checkpoint.

    Its exit code, 75 (EX_TEMPFAIL: "try again later") unless
    --preempted_exit_code says otherwise, tells schedulers and scripts that
    rerunning the same command resumes the run.
    """

    exit_code = 75

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:  # --preempted_exit_code; else the class's 75
            self.exit_code = exit_code
