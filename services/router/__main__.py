"""`python -m services.router`: the same as `turnout router`."""

from services.router.main import main

if __name__ == "__main__":
    main()
