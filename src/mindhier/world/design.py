"""The experimental design of a world's subjects, NSD-like (SPEC §1.1, §1.3).

Every test (shared) image is shown exactly 3 times, every training image up to 3 times (a
``fewer_reps_fraction`` of them only once or twice, as for NSD subjects who did not finish all
sessions), each showing a separate single trial. Showings are shuffled over the whole
experiment, so repetitions of an image land in different sessions, and cut into sessions of
``trials_per_session`` consecutive trials (the last may be shorter). The global trial number —
the row in the betas file — is therefore ``(session − 1) · trials_per_session + trial``.

All subjects see all images (NSD gives each subject its own 9000 training images; here one
pool keeps the world small and lets the vision model train on every image).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mindhier.world.config import WorldConfig

STREAM_DESIGN, STREAM_TEST_SPLIT = 2, 4
TEST_REPS = 3


@dataclasses.dataclass
class Design:
    subject: int
    trials_per_session: int
    image: np.ndarray  # (T,) image index of each global trial
    is_test: np.ndarray  # (T,) bool: a shared test image
    repetition: np.ndarray  # (T,) how many times this image was shown before (0, 1, 2)

    @property
    def n_trials(self) -> int:
        return len(self.image)

    @property
    def n_sessions(self) -> int:
        return -(-self.n_trials // self.trials_per_session)

    @property
    def session(self) -> np.ndarray:
        """(T,) 1-based session of each trial."""
        return np.arange(self.n_trials) // self.trials_per_session + 1

    @property
    def trial_in_session(self) -> np.ndarray:
        """(T,) 0-based position inside its session."""
        return np.arange(self.n_trials) % self.trials_per_session

    def session_rows(self, session: int) -> slice:
        """Global trials (= betas rows) of a 1-based session."""
        start = (session - 1) * self.trials_per_session
        return slice(start, min(start + self.trials_per_session, self.n_trials))


def choose_test_images(cfg: WorldConfig, seed: int) -> np.ndarray:
    """Ascending indices of the shared test images, a seeded subset of all images (like NSD's
    shared1000, scattered through the COCO-73k index space)."""
    rng = np.random.default_rng([seed, STREAM_TEST_SPLIT])
    return np.sort(rng.choice(cfg.n_images, size=cfg.n_test, replace=False))


def make_design(cfg: WorldConfig, seed: int, subject: int, test_images: np.ndarray) -> Design:
    rng = np.random.default_rng([seed, STREAM_DESIGN, subject])
    is_test_image = np.zeros(cfg.n_images, dtype=bool)
    is_test_image[test_images] = True
    train_images = np.flatnonzero(~is_test_image)
    reps = np.full(len(train_images), 3)
    fewer = rng.random(len(train_images)) < cfg.fewer_reps_fraction
    reps[fewer] = rng.integers(1, 3, size=fewer.sum())
    showings = np.concatenate([np.repeat(test_images, TEST_REPS), np.repeat(train_images, reps)])
    image = showings[rng.permutation(len(showings))]
    repetition = np.zeros(len(image), dtype=np.int64)
    seen: dict[int, int] = {}
    for t, i in enumerate(image.tolist()):
        repetition[t] = seen.get(i, 0)
        seen[i] = repetition[t] + 1
    return Design(subject, cfg.trials_per_session, image, is_test_image[image], repetition)
