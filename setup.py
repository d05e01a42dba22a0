"""Installs `layerlab-lm-eval.pth` beside the package so that lm-eval's own CLI knows `--model layerlab`."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "layerlab-lm-eval.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(str(Path("src") / PTH), str(Path(self.build_lib) / PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
