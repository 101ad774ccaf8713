"""The vocabulary both directions and every layer share: the names of the two directions."""

from __future__ import annotations

from typing import Literal

# Forward (Didomi's choices to Braze) and reverse (Braze's reports to Didomi): the spool's
# `direction` column, metric labels and audit records all use these two words.
Direction = Literal["to_braze", "to_didomi"]
