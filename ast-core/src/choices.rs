//! Named choices: fieldless enums whose one list of names serves the config files (serde), the
//! command line (`FromStr`, and clap's `ValueEnum` with the `clap` feature of the crate that
//! declares them), the error messages and the docs.

/// Declares a fieldless enum of named choices.
///
/// ```
/// ast_core::named_choices! {
///     /// Colours.
///     #[derive(Default)]
///     pub enum Colour("colour") {
///         /// Red.
///         #[default]
///         Red = "red",
///         /// Dark blue.
///         DarkBlue = "dark-blue",
///     }
/// }
/// assert_eq!("dark-blue".parse::<Colour>(), Ok(Colour::DarkBlue));
/// assert_eq!(Colour::Red.name(), "red");
/// assert_eq!(
///     "green".parse::<Colour>().unwrap_err(),
///     "unknown colour `green` (valid: red, dark-blue)"
/// );
/// ```
///
/// The enum derives `Debug, Clone, Copy, PartialEq, Eq, Hash` and gets `ALL`, `name`, `names`,
/// `FromStr` (the error names the valid choices), `Display`, serde (as its name) and, where the
/// declaring crate enables a `clap` feature with `clap` as a dependency, `clap::ValueEnum`.
#[macro_export]
macro_rules! named_choices {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident($what:literal) {
            $( $(#[$vmeta:meta])* $variant:ident = $str:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every choice, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The choice's name (config files, command line, messages).
            pub fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $str),+
                }
            }

            /// Every name, comma-separated.
            pub fn names() -> String {
                [$($str),+].join(", ")
            }
        }

        impl ::core::str::FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> ::core::result::Result<Self, String> {
                $name::ALL
                    .iter()
                    .copied()
                    .find(|c| c.name() == s)
                    .ok_or_else(|| format!("unknown {} `{s}` (valid: {})", $what, $name::names()))
            }
        }

        impl ::core::fmt::Display for $name {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(
                &self,
                serializer: S,
            ) -> ::core::result::Result<S::Ok, S::Error> {
                serializer.serialize_str(self.name())
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(
                deserializer: D,
            ) -> ::core::result::Result<Self, D::Error> {
                let s = <String as ::serde::Deserialize>::deserialize(deserializer)?;
                s.parse().map_err(<D::Error as ::serde::de::Error>::custom)
            }
        }

        #[cfg(feature = "clap")]
        impl ::clap::ValueEnum for $name {
            fn value_variants<'a>() -> &'a [Self] {
                $name::ALL
            }

            fn to_possible_value(&self) -> Option<::clap::builder::PossibleValue> {
                Some(::clap::builder::PossibleValue::new(self.name()))
            }
        }
    };
}
