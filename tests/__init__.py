"""The test suite: folders mirror gateway/'s packages, black-box suites are in system/."""
