"""`python -m services.frontend`: the same as `turnout frontend`."""

from services.frontend.main import main

if __name__ == "__main__":
    main()
