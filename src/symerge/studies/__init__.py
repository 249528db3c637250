"""The paper's studies (`symerge study NAME`): each registers itself in `studies.base.STUDIES`."""
