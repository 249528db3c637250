"""The paper's studies (`symerge study NAME`): each registers itself in `studies.base.STUDIES`.

Importing the package registers the built-in studies (their modules are imported here, as `adaptive/__init__.py`
does for the adaptive methods); `studies.runner.run_study` runs one on a suite and writes its output.
"""

from symerge.studies import ablation, head_transfer, init, losses, pilot, teacher, tuning  # noqa: F401  (registration)
from symerge.studies.base import STUDIES, StudyContext, StudyOutput, Variant, get_study, register_study, study_names

__all__ = ["STUDIES", "StudyContext", "StudyOutput", "Variant", "get_study", "register_study", "study_names"]
