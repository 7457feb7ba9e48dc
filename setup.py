"""The one packaging setting pyproject.toml cannot hold: the package list.

It is found (``farmkeys`` and every ``farmkeys.*``, so a new subpackage ships without
an edit here) plus ``farmkeys._sql``, the migrations, which live in sql/ (mapped in
pyproject.toml). Discovery alone misses that one, and pyproject.toml takes either a
list or discovery, not both.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["farmkeys", "farmkeys.*"]), "farmkeys._sql"])
