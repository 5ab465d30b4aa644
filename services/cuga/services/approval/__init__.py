"""The approval authority: human sign-off on the steps its policy marks."""
